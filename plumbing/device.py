"""Where the scripts compute: the device, the autocast dtype, the CPU threads, and train.py's torch.compile."""

import os
import time

import torch

from plumbing.errors import UserError


def pick_device(requested="auto"):
    """'auto' -> cuda if present, then mps, then cpu; anything else is checked and taken as asked. On the CPU it
    also sets the number of threads (set_cpu_threads)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        requested = "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {requested}: MPS is not available here")
    if device.type == "cpu":
        set_cpu_threads()
    return requested


def pick_dtype(requested, device):
    """'auto' -> bfloat16 on a GPU that supports it, else float32."""
    if requested == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def set_cpu_threads():
    """On a CPU, one torch thread per core that is not busy with other work, unless OMP_NUM_THREADS is set.

    Why: torch's threads wait for each other at every matrix product. When another process holds one of the
    cores, every product waits for the thread that is not running, and a small model gets up to 50x slower;
    one thread fewer than the cores costs at most that core's share. Set OMP_NUM_THREADS to choose yourself.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, min(cores, cores - busy_cores())))
    return torch.get_num_threads()


def busy_cores(seconds=0.2):
    """How many cores other processes keep busy now: the machine's non-idle time in /proc/stat over a short
    interval while this process sleeps (Linux), else the load average (which lags by about a minute)."""
    def times():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # (busy, all): idle and iowait are not busy

    try:
        (busy0, all0), _, (busy1, all1) = times(), time.sleep(seconds), times()
        return round((os.cpu_count() or 1) * (busy1 - busy0) / max(1, all1 - all0))
    except (OSError, ValueError, IndexError):
        return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0


def compile_for_training(model, backend="inductor"):
    """torch.compile for train.py --compile: batches of any length (and a smaller last batch) reuse one compilation.

    Why each setting (measured on E2E batches, tiny model, CPU):
    - capture_dynamic_output_shape_ops: GPT.forward runs the head only where a target is (x[keep]), a size that
      depends on the data. Without it dynamo breaks the graph there and compiles the rest again for every new
      number of targets, that is nearly every batch, until its recompile limit (8) makes it give up.
    - dynamic=True: symbolic batch size and length from the first call. dynamic=False compiles once per padded
      length (E2E's 25-140 tokens in multiples of 16: up to 9 lengths, over the limit of 8), and the default
      (None) compiles once static, then again dynamic.
    """
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model, dynamic=True, backend=backend)
