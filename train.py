"""Fine-tune GPT-2 on E2E NLG with LoRA, the LoRA paper's way (Hu et al. 2021, Table 11):

    python train.py --rank 4                                  # gpt2, r=4 on Wq and Wv, 5 epochs
    python train.py --model gpt2-medium --rank 4 --targets q v  # the paper's E2E setting (on a GPU)
    torchrun --nproc_per_node=2 train.py ...                  # data-parallel, same global batch

The loop: batches of E2E examples padded to their own longest sequence -> loss on the completion tokens
only (label-smoothed) -> AdamW on the LoRA parameters alone -> linear warmup then linear decay to zero.
It writes, into --out: adapter.safetensors (the LoRA tensors), log.jsonl (one line per step) and
ckpt.pt (everything --resume needs to continue exactly where it stopped).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpoint import UserError, atomic_write
from data.e2e import prepare
from lora import apply_lora, describe, lora_state_dict, save_adapter, trainable_report
from model import GPT, pick_device, pick_dtype

# Arguments that define what is trained: --resume refuses to continue a run under different ones.
RUN_DEFINING = ("model", "rank", "alpha", "dropout", "targets", "rslora", "init", "data", "epochs", "batch_size",
                "lr", "warmup", "weight_decay", "label_smoothing", "max_iters", "seed", "bucket")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Fine-tune GPT-2 on E2E NLG with LoRA (defaults: the LoRA paper's "
                                "E2E setting, Table 11).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a folder / "
                   ".safetensors file")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=32, help="LoRA alpha; the update is scaled by alpha / r")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout on the LoRA branch's input")
    p.add_argument("--targets", nargs="+", default=["q", "v"], choices=["q", "k", "v", "o", "mlp"],
                   help="which projections get an update")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r")
    p.add_argument("--init", default="kaiming", choices=["kaiming", "gaussian"], help="how A starts")
    p.add_argument("--data", default=str(prepare.DATA_DIR), help="folder of the prepared E2E data (prepared, "
                   "and downloaded, when missing)")
    p.add_argument("--out", default="out", help="folder for adapter.safetensors, log.jsonl and ckpt.pt")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max_iters", type=int, default=None, help="train this many steps instead of --epochs")
    p.add_argument("--batch_size", type=int, default=8, help="examples per optimizer step, over all processes")
    p.add_argument("--grad_accum", type=int, default=1, help="split each batch into this many forward passes "
                   "(less memory, same result)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=500, help="steps of linear warmup")
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--label_smoothing", type=float, default=0.1)
    p.add_argument("--bucket", action="store_true", help="batch examples of similar length together")
    p.add_argument("--eval_interval", type=int, default=500, help="steps between dev-loss evaluations "
                   "(and resume checkpoints)")
    p.add_argument("--eval_examples", type=int, default=None, help="dev examples per evaluation (default: all)")
    p.add_argument("--stop_after", type=int, default=None, help="stop after this step, saving a resume "
                   "checkpoint (to split a run across jobs); the schedule is unchanged")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cuda:1")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto is bf16 where the GPU supports it, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
    return p.parse_args(argv)


def lr_at(step, peak, warmup, total):
    """Linear warmup from 0 to peak over `warmup` steps, then linear decay to 0 at step `total`."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def global_batches(train, args):
    """Yield (step, indices) for every step: epoch e's batches come from a permutation seeded by (seed, e),
    so the batch of any step can be found again from the step alone (that is all --resume needs)."""
    step = 0
    for epoch in range(10**9):
        for indices in prepare.batch_order(train, args.batch_size, args.seed, epoch, bucket=args.bucket):
            yield step, indices
            step += 1


class Run:
    """The distributed setting: one process, or one of torchrun's; rank 0 logs and writes files.

    Under torchrun each process takes the GPU of its LOCAL_RANK (NCCL), or shares the CPU (gloo).
    """

    def __init__(self, requested_device):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.main = self.rank == 0
        self.device = pick_device(requested_device)
        if self.world_size > 1:
            if self.device == "cuda":
                self.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo")

    def sum(self, *values):
        """Add up floats across processes (identity with one)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return tuple(t.tolist())

    def sum_grads(self, params):
        """Add up the gradients of all processes: each process's loss is already divided by the global
        number of target tokens, so the sum is the gradient of the global mean loss."""
        if self.world_size == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def save_checkpoint(out, model, opt, step, args):
    """Everything needed to continue exactly: LoRA weights, optimizer state, RNG states and the step."""
    state = dict(lora=lora_state_dict(model), optimizer=opt.state_dict(), step=step, args=vars(args),
                 torch_rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    with atomic_write(out / "ckpt.pt") as f:
        torch.save(state, f)
    save_adapter(model, out / "adapter.safetensors")


def load_checkpoint(out, args):
    path = out / "ckpt.pt"
    if not path.is_file():
        raise UserError(f"--resume: {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: torch raises many kinds
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    differ = [k for k in RUN_DEFINING if state["args"].get(k) != getattr(args, k)]
    if differ:
        raise UserError("--resume with other settings than the checkpoint's: " +
                        ", ".join(f"--{k} {state['args'].get(k)} (was) vs {getattr(args, k)}" for k in differ))
    return state


def read_log(path, until_step):
    """The log's lines up to until_step (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line["step"] <= until_step]


def train(args):
    """Run the training described by args; returns the trained model (LoRA applied, not merged)."""
    run = Run(args.device)
    device = run.device
    dtype = pick_dtype(args.dtype, device)
    out = Path(args.out)
    if not args.resume and any((out / f).exists() for f in ("adapter.safetensors", "ckpt.pt")):
        raise UserError(f"{out} already holds a run; use --resume to continue it or --out for a new folder")
    if args.batch_size < run.world_size * args.grad_accum:
        raise UserError(f"--batch_size {args.batch_size} is smaller than processes x --grad_accum")

    # Data: prepared (and downloaded) once, by rank 0.
    if run.main:
        prepare.ensure_prepared(args.data, splits=("train", "dev"))
    run.barrier()
    train_split, dev_split = prepare.load_split(args.data, "train"), prepare.load_split(args.data, "dev")

    # Model: the frozen base plus LoRA. The same seed on every process gives every process the same A.
    torch.manual_seed(args.seed)
    model = GPT.from_pretrained(args.model)
    apply_lora(model, rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=args.targets,
               rslora=args.rslora, init=args.init)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_split) / args.batch_size)
    total = args.max_iters if args.max_iters is not None else args.epochs * steps_per_epoch

    start, log = 0, []
    if args.resume:
        state = load_checkpoint(out, args)
        with torch.no_grad():
            for name, tensor in lora_state_dict(model).items():
                tensor.copy_(state["lora"][name])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log = read_log(out / "log.jsonl", start)

    loss_fn = torch.compile(model.loss) if args.compile else model.loss
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{args.model}: {describe(model.lora_config)}, {trainable_report(model)}")
        print(f"{len(train_split):,} training examples, {total:,} steps of {args.batch_size}, on {device} "
              f"({str(dtype).removeprefix('torch.')}), {run.world_size} process(es)")
        if args.warmup >= total:
            print(f"note: --warmup {args.warmup} is not shorter than the run ({total} steps): the learning rate "
                  f"never reaches --lr; pass a smaller --warmup for short runs")

    def evaluate():
        loss_sum, count = prepare.summed_loss(model, dev_split, args.batch_size, device,
                                              limit=args.eval_examples, rank=run.rank,
                                              world_size=run.world_size, autocast=autocast)
        loss_sum, count = run.sum(loss_sum, count)
        return loss_sum / count

    def write_log():
        with atomic_write(out / "log.jsonl") as f:
            f.write("".join(json.dumps(line) + "\n" for line in log).encode())

    model.train()
    bar = tqdm(total=total, initial=start, desc="training", disable=not run.main, dynamic_ncols=True)
    step = start
    val_loss = next((line["val_loss"] for line in reversed(log) if "val_loss" in line), None)
    batches = global_batches(train_split, args)
    try:
        for step, indices in batches:
            if step < start:
                continue  # already done before the resume: skip without touching any RNG
            if step >= total or (args.stop_after is not None and step >= args.stop_after):
                break
            t0 = time.perf_counter()
            lr = lr_at(step, args.lr, args.warmup, total)
            for group in opt.param_groups:
                group["lr"] = lr
            # The global batch, cut into world_size x grad_accum pieces; this process takes its share. Each
            # piece's summed loss is divided by the global number of targets, so the gradients add up to
            # those of the mean loss over the whole batch, however it is split.
            pieces = np.array_split(indices, run.world_size * args.grad_accum)[run.rank::run.world_size]
            n_targets = prepare.target_count(train_split, indices)
            loss_sum = 0.0
            for piece in pieces:
                if len(piece) == 0:
                    continue
                x, y = prepare.make_batch(train_split, piece)
                with autocast:
                    loss = loss_fn(x.to(device), y.to(device), label_smoothing=args.label_smoothing, reduction="sum")
                scaler.scale(loss / n_targets).backward()
                loss_sum += loss.item()
            loss = run.sum(loss_sum)[0] / n_targets
            if not math.isfinite(loss):
                raise UserError(f"the loss became {loss} at step {step + 1}; the last good checkpoint in {out} "
                                f"is intact. Try a lower --lr or --dtype fp32")
            run.sum_grads(params)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            n_tokens = int((train_split.lengths[indices] - 1).sum())  # all processes together, no padding
            line = dict(step=step, loss=round(loss, 6), lr=lr,
                        tokens_per_s=round(n_tokens / (time.perf_counter() - t0)))
            if step % args.eval_interval == 0 or step == total:
                val_loss = evaluate()
                line["val_loss"] = round(val_loss, 6)
            log.append(line)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=line["tokens_per_s"])
            if run.main and "val_loss" in line:
                save_checkpoint(out, model, opt, step, args)
                write_log()
                bar.write(f"step {step}: val loss {val_loss:.4f}")
    except KeyboardInterrupt:
        if run.main:
            bar.write(f"interrupted: saving step {step} to {out} (continue with --resume)")
    bar.close()
    if run.main:
        save_checkpoint(out, model, opt, step, args)
        write_log()
        if step == total and val_loss is not None:
            print(f"done: {step} steps, final val loss {val_loss:.4f}")
        else:
            print(f"stopped at step {step} of {total}; continue with the same command and --resume")
        print(f"adapter: {out / 'adapter.safetensors'}")
    if run.world_size > 1:
        dist.destroy_process_group()
    return model


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
