"""Checks a run makes before any heavy work: arguments, the output folder, and what must be downloaded.

Every mistake a user can make is a one-line `error:` here, before the model loads; offline, one run lists every
missing file at once, each with the URL it comes from and the path to put it.
"""

import os
from pathlib import Path

import torch

from data.e2e import prepare
from tools import files, hf_checkpoint
from tools.device import pick_device

RUN_FILES = ("adapter.safetensors", "ckpt.pt", "log.jsonl")


def require(condition, message):
    if not condition:
        raise SystemExit(f"error: {message}")


def check_numbers(args, rules):
    """rules: {name: (test, what it must be)}; arguments left at None are not checked."""
    for name, (test, what) in rules.items():
        value = getattr(args, name)
        require(value is None or test(value), f"--{name} {value}: must be {what}")


def writable_folder(path):
    """A one-line error unless `path` is, or can be made, a folder we can write into."""
    path = Path(path).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    require(existing.is_dir(), f"{existing} is a file, not a folder")
    require(os.access(existing, os.W_OK | os.X_OK), f"cannot write to {existing} (permission denied or read-only)")


def check_train(args, world_size):
    """train.py's arguments, output folder and downloads; returns the device."""
    positive, at_least_1 = (lambda v: v > 0, "positive"), (lambda v: v >= 1, "at least 1")
    check_numbers(args, dict(rank=at_least_1, alpha=positive, lr=positive, epochs=at_least_1, max_iters=at_least_1,
                             batch_size=at_least_1, grad_accum=at_least_1, eval_interval=at_least_1,
                             eval_examples=at_least_1, stop_after=at_least_1,
                             dropout=(lambda v: 0 <= v < 1, "in [0, 1)"),
                             label_smoothing=(lambda v: 0 <= v < 1, "in [0, 1)"),
                             warmup=(lambda v: v >= 0, "0 or more"), weight_decay=(lambda v: v >= 0, "0 or more")))
    require(args.batch_size >= world_size * args.grad_accum,
            f"--batch_size {args.batch_size} is smaller than processes x --grad_accum ({world_size * args.grad_accum})")
    device = pick_device(args.device)
    out = Path(args.out)
    if args.resume:
        require((out / "ckpt.pt").is_file(), f"--resume: {out / 'ckpt.pt'} not found")
    else:
        made = [name for name in RUN_FILES if (out / name).exists()]
        require(not made, f"{out} already holds a run ({', '.join(made)}); use --resume to continue it, "
                          f"or another --out")
    writable_folder(out)
    writable_folder(args.data)
    fetch_or_list(downloads_for(args.model, args.data, ("train", "dev")))
    return device


def downloads_for(model, data_dir, splits):
    """[(what, url, path)] of the files a run needs and does not have yet (the tokenizer's are checked apart)."""
    csvs = {s: Path(data_dir) / prepare.SPLITS[s] for s in splits if not prepare.is_prepared(data_dir, s)}
    needed = [(f"E2E {path.name}", prepare.URLS[s], path) for s, path in csvs.items() if not path.is_file()]
    if model in hf_checkpoint.PRETRAINED and not hf_checkpoint.hub_file(model).is_file():
        needed.append((f"{model} weights", hf_checkpoint.HUB_URL.format(name=model), hf_checkpoint.hub_file(model)))
    return needed


def fetch_or_list(needed):
    """Get the tokenizer and every file in `needed`; if one cannot be had, one error lists all that is missing."""
    try:
        prepare.get_tokenizer()
        for what, url, path in needed:
            files.download(url, path, desc=what)
        return
    except SystemExit as e:
        reason = str(e).removeprefix("error: ")
    missing = [f"{what}: {url} -> {path}" for what, url, path in needed if not Path(path).is_file()]
    raise SystemExit(f"error: {reason}. Everything still missing (see the README's 'Offline' section): "
                     + " | ".join(missing or ["nothing else"]))


def load_checkpoint(path, args, run_defining):
    """The state train.py saved at path, refused if it was made with other run-defining arguments."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises many kinds
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__})") from None
    differ = [k for k in run_defining if state["args"].get(k) != getattr(args, k)]
    require(not differ, "--resume with other settings than the checkpoint's: " +
            ", ".join(f"--{k} {state['args'].get(k)} (was) vs {getattr(args, k)}" for k in differ))
    return state
