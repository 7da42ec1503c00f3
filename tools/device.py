"""Where the scripts compute: the device, the autocast dtype, and the number of CPU threads."""

import os

import torch


def pick_device(requested="auto"):
    """'auto' -> cuda if present, then mps, then cpu; anything else is checked and taken as asked."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise SystemExit(f"error: unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise SystemExit(f"error: --device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SystemExit(f"error: --device {requested}: MPS is not available here")
    return requested


def pick_dtype(requested, device):
    """'auto' -> bfloat16 on a GPU that supports it, else float32."""
    if requested == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def set_cpu_threads():
    """On a CPU, use one thread per physical core but leave one core free, unless OMP_NUM_THREADS says otherwise.

    Why: OpenMP threads spin-wait for each other at every small matmul; when another process holds one of the
    cores, every step waits for the thread that is not running, and small models get up to 50x slower. Set
    OMP_NUM_THREADS (or torch.set_num_threads) to choose yourself.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    return torch.get_num_threads()
