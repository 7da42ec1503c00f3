"""Fine-tune GPT-2 on E2E NLG with LoRA, the LoRA paper's way (Hu et al. 2021, Table 11):

    python train.py --rank 4                                    # gpt2, r=4 on Wq and Wv, 5 epochs
    python train.py --model gpt2-medium                          # the paper's E2E setting (on a GPU)
    torchrun --nproc_per_node=2 train.py ...                    # data-parallel (DDP), same global batch
    python train.py --preset webnlg                             # WebNLG (or dart) with its Table 11 settings

The loop: a batch of E2E examples padded to its own longest -> loss on the completion tokens only
(label-smoothed) -> AdamW on the LoRA parameters alone -> linear warmup then linear decay to zero.
It writes, into --out: adapter.safetensors (the LoRA tensors), log.jsonl (one line per step) and
ckpt.pt (everything --resume needs to continue exactly where it stopped).
"""

import argparse
import contextlib
import itertools
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoints import run
from checkpoints.loading import trainable_report
from data import tasks
from data.e2e import prepare
from data.e2e.batches import batch_order, dev_loss, load_split, make_batch, target_count
from lora import TARGETS, LoRAConfig, apply_lora
from model import GPT
from plumbing import stopping
from plumbing.device import compile_for_training, pick_dtype
from plumbing.errors import reported

# Arguments that define what is trained: --resume refuses to continue a run under different ones.
RUN_DEFINING = ("model", "rank", "alpha", "dropout", "targets", "rslora", "init", "data", "epochs", "batch_size",
                "lr", "warmup", "weight_decay", "label_smoothing", "max_iters", "seed", "bucket")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune GPT-2 with LoRA on E2E NLG, WebNLG, DART or your own data "
                                "(defaults: the LoRA paper's setting for the --preset task, Table 11).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="e2e", choices=list(tasks.PRESETS), help="the task whose paper settings "
                   "are the defaults (dropout, weight decay, label smoothing); its folder data/TASK is --data's")
    p.add_argument("--model", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a folder / "
                   ".safetensors file")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha; the update is scaled by alpha / r")
    p.add_argument("--dropout", type=float, help="dropout on the LoRA branch's input")
    p.add_argument("--targets", nargs="+", default=["q", "v"], choices=TARGETS,
                   help="which projections get an update")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r")
    p.add_argument("--init", default="kaiming", choices=["kaiming", "gaussian"], help="how A starts")
    p.add_argument("--data", help="folder of the prepared data, data/PRESET of --preset (E2E's is prepared, and "
                   "downloaded, when missing)")
    p.add_argument("--format", default="paper", choices=prepare.FORMATS, help="the data format, when the data "
                   "is prepared here (see data/e2e/prepare.py)")
    p.add_argument("--out", default="out", help="folder for adapter.safetensors, log.jsonl and ckpt.pt")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training set")
    p.add_argument("--max_iters", type=int, default=None, help="train this many steps instead of --epochs")
    p.add_argument("--batch_size", type=int, default=8, help="examples per optimizer step, over all processes")
    p.add_argument("--grad_accum", type=int, default=1, help="split each batch into this many forward passes "
                   "(less memory, same result)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=500, help="steps of linear warmup")
    p.add_argument("--weight_decay", type=float, help="AdamW's decoupled weight decay on the LoRA parameters")
    p.add_argument("--label_smoothing", type=float, help="label smoothing of the loss on the completion tokens")
    p.add_argument("--bucket", action="store_true", help="batch examples of similar length together")
    p.add_argument("--eval_interval", type=int, default=500, help="steps between dev-loss evaluations "
                   "(and resume checkpoints)")
    p.add_argument("--eval_examples", type=int, default=None, help="dev examples per evaluation (None: all of them)")
    p.add_argument("--stop_after", type=int, default=None, help="stop after this step, saving a resume "
                   "checkpoint (to split a run across jobs); the schedule is unchanged")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cuda:1")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto is bf16 where the GPU supports it, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (once: batch shapes are "
                   "symbolic)")
    p.add_argument("--seed", type=int, default=1337, help="seed of LoRA's initial A, the dropout, the batch order")
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")

    def use_preset(task):  # the task's settings as defaults: flags given explicitly still win
        p.set_defaults(data=str(tasks.data_dir(task)), **tasks.PRESETS[task]["train"])

    use_preset("e2e")  # what --help shows
    use_preset(p.parse_known_args(argv)[0].preset)
    return p.parse_args(argv)


def lr_at(step, peak, warmup, total):
    """Linear warmup from 0 to peak over `warmup` steps, then linear decay to 0 at step `total`."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def batches(train_split, args):
    """Yield (step, indices) for every step, epoch after epoch; epoch e's order is seeded by (seed, e), so the
    batch of any step can be found again from the step alone (that is all --resume needs)."""
    step = 0
    for epoch in itertools.count():
        for indices in batch_order(train_split, args.batch_size, args.seed, epoch, bucket=args.bucket):
            yield step, indices
            step += 1


def step_seed(seed, step):
    """The seed of a step's random numbers (its dropout masks), made from (seed, step) as the batch order is from
    (seed, epoch): a step is then the same whenever it is taken, the first time or after --resume. numpy's
    SeedSequence mixes the two because torch seeds its CPU generator with only the low 32 bits of an integer."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def train(args):
    """Run the training described by args; returns the trained model (LoRA applied, not merged)."""
    # Processes: one, or one of torchrun's (each on the GPU of its LOCAL_RANK with NCCL, or on the CPU with gloo).
    world_size, process = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    master = process == 0
    device, out = run.check_train(args, world_size), Path(args.out)
    if world_size > 1:
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    dtype = pick_dtype(args.dtype, device)

    if master:  # data: prepared (and downloaded) once, by the first process
        prepare.prepare_missing(args.data, ("train", "dev"), args.format, args.preset)
    if world_size > 1:
        dist.barrier()
    train_split, dev_split = load_split(args.data, "train"), load_split(args.data, "dev")

    # The model: the frozen base plus LoRA. The same seed on every process gives every process the same A.
    torch.manual_seed(args.seed)
    model = GPT.from_pretrained(args.model)
    config = LoRAConfig(rank=args.rank, alpha=args.alpha, targets=args.targets, dropout=args.dropout,
                        rslora=args.rslora, init=args.init)
    apply_lora(model, config)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)  # fp16's loss scaling
    total = args.max_iters or args.epochs * math.ceil(len(train_split) / args.batch_size)

    # --resume: the LoRA weights, the optimizer's (and the loss scaler's) state, the step and the log, as saved
    start, log = run.resume(out, model, opt, scaler, args, RUN_DEFINING) if args.resume else (0, [])

    # DDP averages the gradients of the processes during backward; each process's loss is scaled below so
    # that the average is the gradient of the mean loss over the whole global batch.
    ddp_model = DDP(model, device_ids=[device] if device.startswith("cuda") else None) if world_size > 1 else model
    forward = compile_for_training(ddp_model) if args.compile else ddp_model  # see plumbing/device.py
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    if master:
        print(f"{args.model}: r={config.rank} alpha={config.alpha:g} on {','.join(config.targets)} "
              f"(scale {config.scale:g}), {trainable_report(model)}")
        print(f"{len(train_split):,} training examples ({train_split.data_format} format), {total:,} steps of "
              f"{args.batch_size}, on {device} ({str(dtype).removeprefix('torch.')}), {world_size} process(es)")

    def eval_due(done):
        return done % args.eval_interval == 0 or done == total

    def save(done):
        run.save(out, model, opt, scaler, done, total, args, log, train_split.data_format)

    def evaluate_and_save(done):
        log[-1]["val_loss"] = round(dev_loss(model, dev_split, args.batch_size, device, args.eval_examples,
                                             autocast), 6)
        save(done)
        bar.write(f"step {done}: val loss {log[-1]['val_loss']:.4f}")

    model.train()
    bar = tqdm(total=total, initial=start, desc="training", disable=not master, dynamic_ncols=True)
    done = start  # optimizer steps taken so far
    try:
        if master and log and log[-1]["step"] == start and eval_due(start) and "val_loss" not in log[-1]:
            evaluate_and_save(start)  # the run was stopped during this step's evaluation: do it now
        for step, indices in batches(train_split, args):  # step: the index of this step, from 0
            if step < start:
                continue  # done before the resume: skipped without touching any RNG
            if step >= total or (args.stop_after is not None and step >= args.stop_after):
                break
            t0 = time.perf_counter()
            torch.manual_seed(step_seed(args.seed, step))  # this step's dropout masks: the same after a --resume
            lr = lr_at(step, args.lr, args.warmup, total)
            for group in opt.param_groups:
                group["lr"] = lr
            # The global batch, cut into world_size x grad_accum pieces; this process takes its share. Each piece's
            # mean loss is weighted by its share of the batch's targets, so the gradients add up to those of the
            # mean loss over the whole batch, however it is split.
            pieces = np.array_split(indices, world_size * args.grad_accum)[process::world_size]
            n_targets, loss_sum = target_count(train_split, indices), 0.0
            for i, piece in enumerate(pieces):
                x, y = make_batch(train_split, piece)
                weight = target_count(train_split, piece) / n_targets
                # DDP would average the gradients after every backward; only the last piece's needs it
                sync = contextlib.nullcontext() if world_size == 1 or i == len(pieces) - 1 else ddp_model.no_sync()
                with sync, autocast:
                    _, loss = forward(x.to(device), y.to(device), label_smoothing=args.label_smoothing)
                    scaler.scale(loss * weight * world_size).backward()
                loss_sum += loss.item() * weight
            if world_size > 1:
                loss_sum = torch.tensor(loss_sum, device=device)
                dist.all_reduce(loss_sum)
                loss_sum = loss_sum.item()
            if not math.isfinite(loss_sum):
                raise run.diverged(loss_sum, step + 1, out, dtype)
            with stopping.deferred():  # a Ctrl-C waits for the whole update: a step is taken all or not at all
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                done = step + 1
                n_tokens = int((train_split.lengths[indices] - 1).sum())  # all processes together, no padding
                log.append(dict(step=done, loss=round(loss_sum, 6), lr=lr,
                                tokens_per_s=round(n_tokens / (time.perf_counter() - t0))))
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=log[-1]["tokens_per_s"])
            if master and eval_due(done):
                evaluate_and_save(done)
    except KeyboardInterrupt:  # Ctrl-C, SIGINT or SIGTERM, anywhere: the state is that at the end of step `done`
        if master:
            bar.write(f"interrupted: saving step {done} to {out}; continue with the same command and --resume")
            save(done)
        raise  # main() exits with status 130
    finally:
        bar.close()
        if world_size > 1:
            dist.destroy_process_group()
    if master:
        save(done)
        if done == total:
            print(f"done: {done} steps, final val loss {log[-1]['val_loss']:.4f}")
        else:
            print(f"stopped at step {done} of {total}; continue with the same command and --resume")
        print(f"adapter: {out / 'adapter.safetensors'}")
    return model


def main(argv=None):
    args = parse_args(argv)
    with reported():
        train(args)


if __name__ == "__main__":
    main()
