"""A training run's folder: the checks train.py makes before any heavy work (arguments, the output folder, what
must be downloaded), and what it saves and resumes from.

Every mistake a user can make is a one-line `error:` here, before the model loads; offline, one run lists every
missing file at once, each with the URL it comes from and the path to put it.
"""

import json
from pathlib import Path

import torch

from checkpoints.adapters import save_adapter
from data import tasks
from data.e2e import prepare
from lora import lora_state_dict
from plumbing import files, hf_checkpoint, outputs, stopping
from plumbing.device import pick_device
from plumbing.errors import UserError

RUN_FILES = ("adapter.safetensors", "ckpt.pt", "log.jsonl")


def require(condition, message):
    if not condition:
        raise UserError(f"{message}")


def check_numbers(args, rules):
    """rules: {name: (test, what it must be)}; arguments left at None are not checked."""
    for name, (test, what) in rules.items():
        value = getattr(args, name)
        require(value is None or test(value), f"--{name} {value}: must be {what}")


def check_train(args, world_size):
    """train.py's arguments, output folder and downloads; returns the device."""
    positive, at_least_1 = (lambda v: v > 0, "positive"), (lambda v: v >= 1, "at least 1")
    check_numbers(args, dict(rank=at_least_1, alpha=positive, lr=positive, epochs=at_least_1, max_iters=at_least_1,
                             batch_size=at_least_1, grad_accum=at_least_1, eval_interval=at_least_1,
                             eval_examples=at_least_1, stop_after=at_least_1,
                             dropout=(lambda v: 0 <= v < 1, "in [0, 1)"),
                             label_smoothing=(lambda v: 0 <= v < 1, "in [0, 1)"),
                             warmup=(lambda v: v >= 0, "0 or more"), weight_decay=(lambda v: v >= 0, "0 or more"),
                             seed=(lambda v: v >= 0, "0 or more")))
    require(args.batch_size >= world_size * args.grad_accum,
            f"--batch_size {args.batch_size} is smaller than processes x --grad_accum ({world_size * args.grad_accum})")
    device = pick_device(args.device)
    # torch would train fp16 on a CPU (slower than fp32 there) but warns, in its own words, that it drops the loss
    # scaling fp16 needs; bf16 has fp32's range and needs none
    require(not (args.dtype == "fp16" and device.startswith("cpu")),
            "--dtype fp16 needs a GPU (CUDA or MPS); on the CPU use --dtype bf16 or fp32")
    out = Path(args.out)
    if args.resume:
        require((out / "ckpt.pt").is_file(), f"--resume: {out / 'ckpt.pt'} not found")
    else:
        made = [name for name in RUN_FILES if (out / name).exists()]
        require(not made, f"{out} already holds a run ({', '.join(made)}); use --resume to continue it, "
                          f"or another --out")
    shape = hf_checkpoint.known_shape(args.model)
    require(shape is None or args.rank <= shape["n_embd"], f"--rank {args.rank}: must be at most the model's n_embd "
            f"({shape and shape['n_embd']}): B A cannot have a higher rank than its smaller side")
    outputs.check_folder(out)  # made by the first save (plumbing/files.py's atomic_write)
    outputs.check_folder(args.data)
    with files.removed_on_failure(args.data):  # a --data folder made for the downloads goes if one fails
        tasks.fetch_or_list(downloads_for(args.model, args.data, ("train", "dev"), args.preset))
    return device


def downloads_for(model, data_dir, splits, task="e2e"):
    """[(what, url, path)] of the files a run needs and does not have yet (the tokenizer's are checked apart)."""
    csvs = {s: Path(data_dir) / prepare.SPLITS[s] for s in prepare.missing_splits(data_dir, splits, task)}
    needed = [(f"E2E {path.name}", prepare.URLS[s], path) for s, path in csvs.items() if not path.is_file()]
    if model in hf_checkpoint.PRETRAINED and not hf_checkpoint.hub_file(model).is_file():
        needed.append((f"{model} weights", hf_checkpoint.HUB_URL.format(name=model), hf_checkpoint.hub_file(model)))
    return needed


def save(out, model, opt, scaler, step, total, args, log, data_format):
    """A run's folder at the end of step `step`: everything --resume needs to continue exactly (the LoRA weights, the
    optimizer's and the loss scaler's state, the step) in ckpt.pt, the adapter in adapter.safetensors, and the log.

    No random state is saved: train.py seeds each step from its number. Each file is written atomically, and a
    Ctrl-C waits for all three (a half-saved run is never left). ckpt.pt comes last: it is what --resume starts
    from, so after a crash between two files the log already holds every step up to ckpt.pt's."""
    state = dict(lora=lora_state_dict(model), optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step,
                 total=total, args=vars(args))
    with stopping.deferred():
        save_adapter(model, out / "adapter.safetensors", data_format)  # first: it refuses non-finite tensors
        with files.atomic_write(out / "log.jsonl") as f:
            f.write("".join(json.dumps(line) + "\n" for line in log).encode())
        files.atomic_torch_save(state, out / "ckpt.pt")


def resume(out, model, opt, scaler, args, run_defining):
    """(step, log) of the run saved in out, with its LoRA weights and its optimizer's and loss scaler's state put
    back into model, opt and scaler; refused if it was made with other run-defining arguments."""
    state = load_checkpoint(out / "ckpt.pt", args, run_defining)
    with torch.no_grad():
        for name, tensor in lora_state_dict(model).items():
            tensor.copy_(state["lora"][name])
    opt.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # empty unless the run was in fp16; a run that was not starts fp16's scale afresh
        scaler.load_state_dict(state["scaler"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][:state["step"]]
    require(len(log) == state["step"], f"{out / 'log.jsonl'} has {len(log)} steps, fewer than the {state['step']} "
            f"of {out / 'ckpt.pt'}: it does not belong to this checkpoint")
    return state["step"], log


def saved_step(out):
    """The step of the checkpoint in out, or None where there is none."""
    path = Path(out) / "ckpt.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["step"] if path.is_file() else None


def diverged(loss, step, out, dtype):
    """The error for a loss that became `loss` (NaN or infinite) at step `step` (from 1): what is left, what to try.
    Step 1 comes before any update (B = 0): the base model alone gave that loss, so the learning rate is not the
    cause. Only the half-precision dtypes overflow where fp32 would not: --dtype fp32 is suggested to those alone."""
    half = dtype != torch.float32
    saved = saved_step(out)
    kept = (f"the last good checkpoint in {out} (step {saved}) is intact (nothing non-finite is ever saved)"
            if saved is not None else "nothing was saved")
    if step == 1:
        cause = (f"it may overflow {str(dtype).removeprefix('torch.')} (try --dtype fp32), or --model's weights are "
                 "not all finite" if half else "check that --model's weights are all finite")
        return UserError(f"the loss became {loss} at step 1, before any update, so the base model itself gives it: "
                         f"{cause}; {kept}")
    return UserError(f"the loss became {loss} at step {step}; {kept}. Try a lower --lr" +
                     (" or --dtype fp32" if half else ""))


def load_checkpoint(path, args, run_defining):
    """The state train.py saved at path, refused if it was made with other run-defining arguments."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises many kinds
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    differ = [k for k in run_defining if state["args"].get(k) != getattr(args, k)]
    require(not differ, "--resume with other settings than the checkpoint's: " +
            ", ".join(f"--{k} {state['args'].get(k)} (was) vs {getattr(args, k)}" for k in differ))
    return state
