"""One prepared GPU check: what only a CUDA GPU can tell, in one command and one report to paste into an issue.

    pip install -r requirements-dev.txt
    python -m tools.gpu_check                 # on one CUDA GPU: about 5 minutes on an H200, at most 8
    python -m tools.gpu_check --skip_bench    # without bench.py's sections 3, 5 and 6
    python -m tools.gpu_check --dry_run       # the CPU dry run (what it does where there is no CUDA)

The checks, each PASS or FAIL with its numbers:
  1. parity: our GPT's logits vs transformers' GPT2LMHeadModel on the same random weights (save_pretrained), fp32;
  2. merge: an adapter trained for a few steps, merged (lora.merge_lora) vs unmerged, compared as merge.py
     --check-only does (float64 logits and greedy continuations, merge.py's own functions);
  3. bf16: LoRA training steps under bf16 autocast lower the loss and leave every LoRA tensor finite;
  4. compile: compile_for_training (plumbing/device.py, what train.py --compile uses) on batches of varied
     lengths: compilations stay bounded and the losses equal eager's (fp32);
  5. speed: GPT-2 medium's shape (random weights: no checkpoint needed), LoRA r=4 on q, v, batch 8 of E2E-like
     lengths, bf16: eager vs compiled step time, the paper's full run estimated from it, and MFU;
  6. bench.py on CUDA (python -m tools.bench --device cuda --sections 3 5 6), as a subprocess.
Without CUDA it says so, runs checks 1-5 on tiny shapes on the CPU (torch.compile with the eager backend:
dynamo's graphs and compilation count are the same, and inductor takes minutes to compile there), so that this
script is itself tested, and exits 0 if they pass.
The exit status is 1 when a check fails.
"""

import argparse
import contextlib
import datetime
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoints.merged import compare, model_outputs
from data.e2e import batches, prepare
from data.tasks import EOT
from lora import LoRAConfig, apply_lora, lora_state_dict, merge_lora
from model import GPT, GPTConfig
from plumbing.device import compile_for_training, set_cpu_threads
from plumbing.errors import UserError
from tools import bench

ROOT = Path(__file__).resolve().parents[1]
LORA = dict(rank=4, alpha=32, targets=("q", "v"))  # the paper's E2E setting (train.py's defaults)
LABEL_SMOOTHING = 0.1
BATCH_SIZE = 8
EPOCHS = 5
FULL_RUN_STEPS = EPOCHS * math.ceil(bench.E2E_TRAIN_EXAMPLES / BATCH_SIZE)  # 5 x 5,258 = 26,290
TINY = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, block_size=128)  # the tests' shape
DRY = dict(TINY, vocab_size=1024)  # the dry run's training shape: the head of 50257 would take most of its time
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)
GPT2_MEDIUM = dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, block_size=1024)
MAX_COMPILATIONS = 2  # what compile_for_training needs for any mix of lengths (measured: 1)


@dataclass
class Plan:
    """Shapes and step counts of one run: the real check on CUDA, or the CPU dry run."""

    device: str
    parity: tuple  # (shape, tolerance) pairs
    small: dict  # the shape of the merge and bf16 checks
    compile_shape: dict  # the compile check's (its time goes into compiling, which grows with the layers)
    speed: dict  # the shape whose step time is measured
    backend: str  # torch.compile's backend
    bf16_steps: int
    bf16_lr: float
    compile_batches: int
    warmup: int
    timed_steps: int
    batch_size: int
    length_scale: float  # example lengths times this (the dry run's are halved: short steps, tiny block_size)


CUDA_PLAN = Plan(device="cuda", parity=((TINY, 1e-5), (GPT2, 1e-4)), small=GPT2, compile_shape=dict(GPT2, n_layer=4),
                 speed=GPT2_MEDIUM, backend="inductor", bf16_steps=20, bf16_lr=2e-3, compile_batches=12, warmup=3,
                 timed_steps=30, batch_size=BATCH_SIZE, length_scale=1.0)
DRY_PLAN = Plan(device="cpu", parity=((TINY, 1e-5),), small=DRY, compile_shape=DRY, speed=DRY, backend="eager",
                bf16_steps=8, bf16_lr=1e-2, compile_batches=6, warmup=1, timed_steps=2, batch_size=4,
                length_scale=0.5)


def compilations():
    """How many graphs dynamo has compiled in this process: every compilation and recompilation (each graph
    break adds one too). Not a count of backend calls: with dynamic=True dynamo traces the first call twice
    (it restarts once to specialize the float label_smoothing), for one compilation."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# ----------------------------------------------------------------------------------------------------------
# Models and data.

def lora_model(shape, device, seed=0, dropout=0.0):
    """A GPT of the given shape with random weights (GPT-2's init), LoRA r=4 on q and v, in training mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT(GPTConfig(**shape))
    return apply_lora(model, LoRAConfig(**LORA, dropout=dropout)).train()


def optimizer(model, lr=2e-4):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)


def train_step(forward, opt, x, y, autocast=None):
    """One step as train.py takes it (one piece, no DDP): label-smoothed loss on the targets, AdamW. Returns the
    loss."""
    with autocast or contextlib.nullcontext():
        _, loss = forward(x, y, label_smoothing=LABEL_SMOOTHING)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def paper_like_split(n_examples, seed=0, scale=1.0, n_tokens=EOT):
    """A Split of random tokens (of the first n_tokens ids) with the lengths of E2E's paper format (measured on
    its dev set: prompts 15-41 tokens, mean 31; whole examples 25-125, mean 59; here up to 140), times scale,
    each ending with <|endoftext|>."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.normal(31.5, 6.8, n_examples) * scale, 2, 45 * scale).round().astype(np.int64)
    completions = np.clip(rng.normal(27.7, 10.0, n_examples) * scale, 2, 95 * scale).round().astype(np.int64)
    lengths = prompt_lens + completions
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(0, n_tokens, int(offsets[-1])).astype(np.uint16)
    tokens[offsets[1:] - 1] = EOT
    return batches.Split(tokens=tokens, offsets=offsets, prompt_lens=prompt_lens.astype(np.int32))


def e2e_split(workdir, plan):
    """The E2E dev set (prepared from ../shared/data/e2e, when it and the tokenizer files are here) on CUDA, else
    paper_like_split. Returns (split, description)."""
    csv = bench.SHARED / "e2e" / "devset.csv"
    if plan.device == "cuda" and csv.is_file():
        if "TIKTOKEN_CACHE_DIR" not in os.environ and (bench.SHARED / "tiktoken_cache").is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(bench.SHARED / "tiktoken_cache")
        try:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # no progress bar
                prepare.prepare(workdir, source=csv.parent, splits=("dev",))
            return batches.load_split(workdir, "dev"), "the E2E dev set (paper format)"
        except UserError:
            pass
    split = paper_like_split(4672, scale=plan.length_scale)
    return split, f"synthetic lengths like E2E's paper format (mean {split.lengths.mean():.0f} tokens)"


def batch_list(split, n, plan, pad_to=1, seed=0):
    """n batches of the split in train.py's order for epoch 0 (no bucketing), as (x, y, indices) on the device;
    token ids folded into the model's vocabulary where it is smaller than GPT-2's (the dry run's)."""
    made, vocab = [], plan.small["vocab_size"]
    for indices in batches.batch_order(split, plan.batch_size, seed, epoch=0)[:n]:
        x, y = batches.make_batch(split, indices, pad_to=pad_to)
        x, y = x % vocab, torch.where(y >= 0, y % vocab, y)
        made.append((x.to(plan.device), y.to(plan.device), indices))
    return made


# ----------------------------------------------------------------------------------------------------------
# The checks. Each returns (passed, one line of numbers).

def check_parity(plan, tmp):
    """Our logits vs transformers' on the same random weights, written by save_pretrained, in fp32."""
    transformers, _ = bench.quiet_transformers()
    torch.set_float32_matmul_precision("highest")  # no TF32: both sides in true fp32
    worst, lines = True, []
    for i, (shape, tolerance) in enumerate(plan.parity):
        torch.manual_seed(i)
        config = transformers.GPT2Config(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                                         vocab_size=shape["vocab_size"], n_positions=shape["block_size"],
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf = transformers.GPT2LMHeadModel(config)
        with torch.no_grad():  # every weight (biases, LayerNorms too) random: a misplaced one changes the logits
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        folder = Path(tmp) / f"parity{i}"
        hf.save_pretrained(folder)
        hf = hf.to(plan.device).eval()
        ours = GPT.from_pretrained(folder).to(plan.device).eval()
        idx = torch.randint(0, shape["vocab_size"], (2, min(128, shape["block_size"])), device=plan.device)
        with torch.no_grad():
            ref = hf(idx).logits
            diff = (ours(idx)[0] - ref).abs().max().item()
        worst &= diff <= tolerance
        lines.append(f"L{shape['n_layer']} d{shape['n_embd']}: max |logit diff| {diff:.2e} (tolerance "
                     f"{tolerance:.0e}, logits up to {ref.abs().max().item():.1f})")
        del hf, ours
    return worst, "; ".join(lines)


def check_merge(plan, tmp):
    """A briefly trained adapter (every target, B far from zero) merged vs unmerged, with merge.py's own check:
    float64 logits and greedy continuations on a few prompts."""
    torch.manual_seed(0)
    model = apply_lora(GPT(GPTConfig(**plan.small)), LoRAConfig(rank=4, alpha=32, targets=("q", "k", "v", "o", "mlp")))
    model.to(plan.device).train()
    opt = optimizer(model, lr=1e-2)
    g = torch.Generator(device=plan.device).manual_seed(0)
    vocab = plan.small["vocab_size"]
    for _ in range(5):
        x = torch.randint(0, vocab, (4, 33), device=plan.device, generator=g)
        train_step(model, opt, x[:, :-1], x[:, 1:])
    model.eval().double()
    prompts = [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (5, 9, 17, 30)]
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # merge.py's progress bars
        unmerged = model_outputs(model, prompts, 16, "unmerged")
        model.float()
        merge_lora(model)
        model.double()
        merged = model_outputs(model, prompts, 16, "merged")
    figures = compare(unmerged, merged)
    b_norm = max(t.abs().max().item() for n, t in lora_state_dict(model).items() if n.endswith("lora_B"))
    ok = figures["max_diff"] <= 1e-4 and figures["same"] == figures["n"] and b_norm > 0
    return ok, (f"max |logit diff| {figures['max_diff']:.2e} (tolerance 1e-04, merge.py's), mean "
                f"{figures['mean_diff']:.2e}, greedy continuations identical {figures['same']}/{figures['n']}, "
                f"max |B| {b_norm:.3f}")


def check_bf16(plan, tmp):
    """LoRA steps under bf16 autocast on one E2E-like batch, repeated: the loss falls, LoRA tensors stay finite
    (and fp32: autocast computes in bf16, the parameters and AdamW's state stay fp32)."""
    model = lora_model(plan.small, plan.device, dropout=0.1)
    opt = optimizer(model, lr=plan.bf16_lr)
    # tokens of 256 ids only: a pattern even a random model picks up in a few steps (measured on GPT-2 124M's
    # shape, fp32, lr 2e-3: 10.9 -> 9.4 in 10 steps)
    x, y, _ = batch_list(paper_like_split(64, seed=1, scale=plan.length_scale, n_tokens=256), 1, plan)[0]
    autocast = torch.autocast(plan.device, dtype=torch.bfloat16)
    losses = [train_step(model, opt, x, y, autocast) for _ in range(plan.bf16_steps)]
    lora = lora_state_dict(model).values()
    finite = all(torch.isfinite(t).all().item() and t.dtype == torch.float32 for t in lora)
    ok = finite and losses[-1] < losses[0] - 0.1
    return ok, (f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps (lr {plan.bf16_lr:g}; must fall "
                f"by 0.1), LoRA tensors finite fp32: {finite}")


def check_compile(plan, tmp):
    """compile_for_training on batches of varied lengths (padded to 1 and to 16, and a smaller last batch):
    the number of compilations, and the losses against an eager run of the same model (fp32)."""
    torch.set_float32_matmul_precision("highest")  # TF32 would differ from eager by more than compile does
    split = paper_like_split(2000, seed=2, scale=plan.length_scale)
    data = batch_list(split, plan.compile_batches, plan)
    data[1::3] = batch_list(split, plan.compile_batches, plan, pad_to=16)[1::3]
    x, y, _ = data[-1]
    data[-1] = (x[:3], y[:3], None)  # the last batch of an epoch is smaller
    before, losses = compilations(), {}
    for name in ("eager", "compiled"):
        model = lora_model(plan.compile_shape, plan.device)
        opt = optimizer(model, lr=1e-3)
        forward = compile_for_training(model, plan.backend) if name == "compiled" else model
        losses[name] = np.array([train_step(forward, opt, x, y) for x, y, _ in data])
    rel = float(np.max(np.abs(losses["compiled"] - losses["eager"]) / np.abs(losses["eager"])))
    lengths = sorted({x.shape[1] for x, _, _ in data})
    count = compilations() - before
    ok = count <= MAX_COMPILATIONS and rel <= 1e-4
    return ok, (f"{count} compilation(s) (bound {MAX_COMPILATIONS}) for {len(data)} batches of "
                f"{len(lengths)} lengths ({lengths[0]}-{lengths[-1]}, batch sizes {plan.batch_size} and 3); losses "
                f"vs eager: max relative diff {rel:.1e} (tolerance 1e-4), {plan.backend}")


def check_speed(plan, tmp):
    """Step time of the speed shape in bf16, eager (padded to the longest, as train.py) vs compiled (padded to
    16, as train.py pads under --compile, and not padded), alternating on the same batches after warm-up; the
    paper's full run estimated from it, and MFU."""
    torch.set_float32_matmul_precision("high")
    split, name = e2e_split(Path(tmp) / "e2e", plan)
    n = plan.warmup + plan.timed_steps
    plain, padded = batch_list(split, n, plan), batch_list(split, n, plan, pad_to=16)
    eager = lora_model(plan.speed, plan.device, dropout=0.1)
    compiled_model = lora_model(plan.speed, plan.device, dropout=0.1)
    before = compilations()
    compiled = compile_for_training(compiled_model, plan.backend)
    compiled_opt = optimizer(compiled_model)  # both compiled sides train the one compiled model
    sides = {"eager": (eager, optimizer(eager), plain), "compiled": (compiled, compiled_opt, plain),
             "compiled, padded to 16": (compiled, compiled_opt, padded)}
    autocast = torch.autocast(plan.device, dtype=torch.bfloat16)

    def side(key, offset):
        forward, opt, data = sides[key]
        return lambda i: train_step(forward, opt, data[offset + i][0], data[offset + i][1], autocast)

    t0 = time.perf_counter()
    for i in range(plan.warmup):  # the first compiled call compiles (forward, then backward)
        for key in sides:
            side(key, 0)(i)
    warm_s = time.perf_counter() - t0
    # then alternating rounds (A B C, C B A, ...), each side on batch warmup + r in round r
    times = bench.alternate({key: side(key, plan.warmup) for key in sides}, plan.timed_steps, 0, plan.device)
    timed = plain[plan.warmup:]
    cfg = plan.speed
    n_lora = sum(p.numel() for p in eager.parameters() if p.requires_grad)
    flops = [bench.lora_train_flops(cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"],
                                    split.lengths[idx] - 1, batches.target_count(split, idx), n_lora)
             for _, _, idx in timed]
    tokens = sum(int((split.lengths[idx] - 1).sum()) for _, _, idx in timed)
    peak = bench.peak_tflops(torch.cuda.get_device_name() if plan.device == "cuda" else "")
    lines = [f"L{cfg['n_layer']} d{cfg['n_embd']} h{cfg['n_head']}, LoRA r=4 q,v ({n_lora:,} trained), batch "
             f"{plan.batch_size} of {name}, bf16 autocast; {plan.warmup} warm-up steps ({warm_s:.0f} s, compiling "
             f"included), {len(timed)} timed steps per side, alternating"]
    for key, t in times.items():
        mean = float(np.mean(t))
        mfu = sum(flops) / sum(t) / (peak * 1e12) if peak else None
        lines.append(f"{key}: {1e3 * mean:.1f} ms/step mean ({1e3 * float(np.median(t)):.1f} median), "
                     f"{tokens / sum(t):,.0f} tokens/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, "
                     f"full run {FULL_RUN_STEPS:,} steps x {1e3 * mean:.1f} ms = {FULL_RUN_STEPS * mean / 3600:.2f} h")
    speedup = float(np.mean(times["eager"]) / np.mean(times["compiled"]))
    count = compilations() - before
    lines.append(f"compiled/eager speed-up {speedup:.2f}x; {count} compilation(s)")
    peak_text = "no peak known for this device" if peak is None else f"{peak:g} TFLOP/s, dense bf16"
    lines.append(f"MFU = useful FLOPs / time / peak ({peak_text}); useful FLOPs per step = sum over real tokens "
                 f"of 4 N_body (frozen weights: 2 forward + 2 for the input gradient, no weight gradient; N_body = "
                 f"12 L d^2) + 6 N_lora + attention 12 L d n (n = the sequence's length) + the head 4 d V per target "
                 f"token; padding not counted (bench.lora_train_flops)")
    lines.append(f"full run = {EPOCHS} epochs x ceil({bench.E2E_TRAIN_EXAMPLES:,} / {BATCH_SIZE}) = "
                 f"{FULL_RUN_STEPS:,} steps x the mean step time (the dev set's lengths standing for the training "
                 f"set's); evaluation and checkpoints not included")
    # the issue's target, compiled at least as fast as eager after warm-up, is for inductor (the dry run's eager
    # backend only traces: it is not meant to be faster)
    ok = count <= MAX_COMPILATIONS and (speedup >= 1.0 or plan.backend != "inductor")
    return ok, "\n      ".join(lines)


def check_bench(plan, tmp):
    """bench.py on CUDA, in its own process (it sets its own threads and compile options): section 3 (greedy
    decoding and the fraction of the memory-bandwidth limit), 5 (MFU, an E2E epoch) and 6 (batched beam search)."""
    command = [sys.executable, "-m", "tools.bench", "--device", "cuda", "--sections", "3", "5", "6"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    output = (done.stdout + ("" if done.returncode == 0 else done.stderr[-3000:])).strip()
    return done.returncode == 0, f"{' '.join(command[1:])}: exit {done.returncode}\n" + "\n".join(
        "      " + line for line in output.splitlines())


CHECKS = {"parity": check_parity, "merge": check_merge, "bf16": check_bf16, "compile": check_compile,
          "speed": check_speed, "bench": check_bench}


# ----------------------------------------------------------------------------------------------------------
# The report.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The checks that need a CUDA GPU, with one report (PASS/FAIL and "
                                "numbers). Without CUDA: a short CPU dry run on tiny shapes.")
    p.add_argument("--dry_run", action="store_true", help="the CPU dry run even where there is CUDA (default: off)")
    p.add_argument("--skip_bench", action="store_true", help="leave out bench.py's sections 3, 5 and 6 (default: off)")
    p.add_argument("--only", nargs="+", choices=list(CHECKS), default=None, help="run these checks only (default: all)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.dry_run
    plan = CUDA_PLAN if cuda else DRY_PLAN
    names = [n for n in (args.only or CHECKS) if not (n == "bench" and (args.skip_bench or not cuda))]
    gpu = torch.cuda.get_device_name() if cuda else "none"
    print(f"lora-gpt GPU check | {datetime.datetime.now():%Y-%m-%d %H:%M} | GPU {gpu} | torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}) | python {sys.version.split()[0]}")
    if not cuda:
        print("no CUDA: a dry run on the CPU with tiny shapes (it tests this script; it measures no GPU)")
        set_cpu_threads()  # OpenMP threads on a shared machine can make these tiny steps 50x slower
    results = {}
    with tempfile.TemporaryDirectory(prefix="lora-gpt-gpu-check-") as tmp:
        for name in names:
            t0 = time.perf_counter()
            torch._dynamo.reset()  # each check counts its own compilations
            try:
                ok, text = CHECKS[name](plan, tmp)
            except Exception as e:  # a crash is a FAIL of that check; the others still run
                ok, text = False, f"{type(e).__name__}: {e}"
            results[name] = ok
            print(f"[{'PASS' if ok else 'FAIL'}] {name} ({time.perf_counter() - t0:.0f} s): {text}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
    failed = [name for name, ok in results.items() if not ok]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed"
          f"{' (failed: ' + ', '.join(failed) + ')' if failed else ''}; wall time {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
