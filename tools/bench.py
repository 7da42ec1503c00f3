"""Speed and memory of lora-gpt against transformers + PEFT, side by side, in one run on the same weights.

    python -m tools.bench                          # sections 1-4 and 6 on CPU
    python -m tools.bench --quick                  # fewer repeats and 16 new tokens: a smoke test
    python -m tools.bench --sections 1 3           # some sections only
    python -m tools.bench --device cuda --compile  # on a GPU: bf16 autocast, plus section 5 (MFU, E2E epoch time)
    python -m tools.bench --sections 4 6 --write docs/performance.md --force   # the page, written by this run

Sections: 1. a LoRA training step (ours vs GPT2LMHeadModel + PEFT LoRA): tokens/s and peak memory;
2. peak memory of LoRA vs full fine-tuning on the GPT-2 medium shape; 3. greedy generation (our KV cache vs our
no-cache path vs transformers' generate); 4. forward latency of the base vs merged vs unmerged LoRA model;
5. (CUDA, or any device given --peak_tflops) MFU and an E2E epoch-time estimate for GPT-2 medium; 6. beam search
over 64 E2E test MRs (eval.py's batched decoding vs one MR at a time vs transformers' beam generate), tiny model.
Section 3 also measures the memory-read bandwidth and the batch-1 fraction of its limit, and times the opt-in
layouts of tools/fast_decode.py (transposed, packed) beside the plain cache; with --compile, also a decode step
compiled by torch.compile.

How it measures, so that the ratios mean something:
  - the same weights: a random transformers GPT2LMHeadModel (dropout 0) is saved to a temporary folder and both
    sides load it from there (ours with GPT.from_pretrained);
  - the same inputs: batches of the E2E dev set (../shared/data/e2e, when present) or synthetic ones of E2E-like
    lengths; our loss ignores the prompt and the padding (targets -1), PEFT's is given -100 there;
  - the sides alternate (A B, then B A, ...) in the same process after untimed warm-up calls, and every figure
    is a median of several; a ratio is the median of the per-round ratios;
  - memory is measured in a fresh child process per side (python -m tools.bench --_child ...), so the sides cannot
    inflate each other's figures (see MemoryProbe).

Only this script needs transformers and peft (requirements-dev.txt); the project never imports them.
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from beam import NEWLINES, beam_search, beam_search_batch, prompt_batches
from data import tasks
from data.e2e import batches, prepare
from data.tasks import EOT
from lora import LoRAConfig, apply_lora, lora_state_dict, merge_lora
from model import GPT
from plumbing import outputs
from plumbing.device import compile_for_training
from plumbing.errors import UserError, reported
from plumbing.hf_checkpoint import PRETRAINED
from tools.fast_decode import packed_weights, transposed_weights

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # the read-only E2E CSVs and tiktoken files, where present
BATCH_SIZE = 8
N_BATCHES = 16  # distinct training batches, reused round-robin by the timed steps
LORA = dict(rank=4, alpha=32, dropout=0.1)  # the paper's GPT-2 E2E setting (train.py's defaults)
LR, WEIGHT_DECAY, LABEL_SMOOTHING = 2e-4, 0.01, 0.1
NEW_TOKENS = 128
E2E_TRAIN_EXAMPLES = 42_061  # rows of the E2E training set
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peak (SXM)
MIB = 2**20
SHAPES = {**PRETRAINED, "tiny": dict(n_layer=2, n_head=4, n_embd=64)}  # tiny: the tests' model (tests/conftest.py)
BEAM = dict(beam=10, max_new_tokens=64, length_penalty=0.8, no_repeat_ngram=4)  # eval.py's defaults (the paper's)
BEAM_MRS, BEAM_BATCH = 64, 16  # section 6: test MRs decoded, and eval.py's --beam_batch


# ----------------------------------------------------------------------------------------------------------
# Pure helpers: numbers in, numbers or text out (tests/test_bench.py checks them).

def synthetic_split(n_examples, seed=0):
    """A batches.Split of random tokens with E2E-like lengths: a prompt of 25-40 tokens, 50-110 tokens in all,
    the last one <|endoftext|> (used when the E2E dev set is not at hand)."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(25, 41, n_examples)
    lengths = np.maximum(rng.integers(50, 111, n_examples), prompt_lens + 2)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(0, EOT, int(offsets[-1])).astype(np.uint16)
    tokens[offsets[1:] - 1] = EOT
    return batches.Split(tokens=tokens, offsets=offsets, prompt_lens=prompt_lens.astype(np.int32))


def hf_labels(targets):
    """Our targets (-1 where no loss) as Hugging Face labels (-100 where no loss)."""
    return targets.masked_fill(targets == -1, -100)


def attention_mask(lengths, width):
    """(B, width) 1 on each row's first lengths[b] positions, 0 on its padding: what a data collator gives."""
    return (torch.arange(width)[None, :] < torch.as_tensor(lengths)[:, None]).long()


def lora_train_flops(n_layer, n_embd, vocab_size, lengths, n_targets, n_lora_params):
    """Useful FLOPs of one LoRA training step on sequences of the given lengths (padding excluded).

    Per token, each frozen matmul weight costs 2 FLOPs forward and 2 backward (the input's gradient; no weight
    gradient is formed): 4 * N_body, N_body = 12 * n_layer * n_embd^2 (c_attn, attn c_proj, c_fc, mlp c_proj).
    The head (tied, frozen) runs only where there is a target: 4 * n_embd * vocab per target. The LoRA weights
    are trained: 6 * N_lora per token. Attention, as in PaLM's MFU (no causal halving): 12 * n_layer * n_embd * n
    per token of a sequence of n tokens, i.e. 12 * n_layer * n_embd * n^2 per sequence.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    n_tokens = lengths.sum()
    n_body = 12 * n_layer * n_embd**2
    return float((4 * n_body + 6 * n_lora_params) * n_tokens + 4 * n_embd * vocab_size * n_targets
                 + 12 * n_layer * n_embd * (lengths**2).sum())


def decode_bytes(model):
    """Bytes one greedy token reads at batch 1, at least: every weight once (the head is wte, tied, and reads all
    of it), except the position table, of which it reads one row."""
    wpe = model.transformer.wpe.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - wpe.numel() * wpe.element_size() + wpe.size(1) * wpe.element_size()


def peak_tflops(device_name, override=None):
    """The dense bf16 peak of a GPU from its name (H100/H200 SXM 989, A100 312), or `override`; None if unknown."""
    if override is not None:
        return float(override)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def paired_ratios(numerators, denominators):
    """The median of numerators[i] / denominators[i] over the rounds both sides ran."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=False))


def verdict(ratio, target):
    """'yes' or 'NO' for a target (">=", 1.2) or ("<=", 0.9); '' when there is no target."""
    if target is None or ratio is None:
        return ""
    op, value = target
    return "yes" if (ratio >= value if op == ">=" else ratio <= value) else "NO"


def number(value, digits=None):
    """A table cell: thousands separators for large figures, a few significant digits for small ones."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if digits is not None:
        return f"{value:.{digits}f}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown_table(rows):
    """rows of dict(what, ours, theirs, ratio, target, digits) -> a markdown table with a met? column."""
    lines = ["| what | ours | theirs | ratio | target | met? |", "| --- | ---: | ---: | ---: | --- | --- |"]
    for row in rows:
        ratio, target = row.get("ratio"), row.get("target")
        ratio_text = "-" if ratio is None else f"{ratio:.{row.get('ratio_digits', 2)}f}x"
        target_text = "" if target is None else f"{target[0]} {target[1]}x"
        lines.append(f"| {row['what']} | {number(row.get('ours'), row.get('digits'))} | "
                     f"{number(row.get('theirs'), row.get('digits'))} | {ratio_text} | {target_text} | "
                     f"{verdict(ratio, target)} |")
    return "\n".join(lines)


def round_order(names, round_index):
    """The order in which the sides run in a round: as given in even rounds, reversed in odd ones (A B, B A, ...),
    so that no side always runs first (on a warm cache) or last."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


# ----------------------------------------------------------------------------------------------------------
# Timing and memory.

def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def alternate(sides, repeats, warmup, device):
    """Call each side's function(i) `warmup` times untimed, then `repeats` timed rounds in alternating order.

    sides: {name: function(i)}; i counts calls (0, 1, ...) and is the same for every side in a round, so the
    sides see the same inputs in the same round. Returns {name: [seconds per timed round]}.
    """
    for i in range(warmup):
        for name in round_order(sides, i):
            sides[name](i)
    times = {name: [] for name in sides}
    for r in range(repeats):
        for name in round_order(sides, r):
            synchronize(device)
            t0 = time.perf_counter()
            sides[name](warmup + r)
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def read_bandwidth(device, n_bytes=2**30):
    """The device's memory-read rate, bytes/s: the best of 5 sums over an n_bytes fp32 tensor (a sum reads each
    byte once and does next to no arithmetic, so it runs at the rate memory delivers)."""
    x = torch.ones(n_bytes // 4, device=device)
    times = []
    for _ in range(6):  # the first is warm-up
        synchronize(device)
        t0 = time.perf_counter()
        x.sum()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return n_bytes / min(times[1:])


def read_proc_status():
    """VmRSS and VmHWM (the resident-set high-water mark) of this process in bytes, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024  # reported in kB
    return values


class MemoryProbe:
    """Peak memory of what runs inside the `with`, above what was in use when it began (probe.extra), and the
    whole peak (probe.peak), in bytes.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensors only, caching excluded).
    CPU (Linux): writing 5 to /proc/self/clear_refs resets the process's RSS high-water mark to its current RSS;
    the peak is VmHWM afterwards. That counts every resident byte (tensors, allocator slack, library buffers),
    so each side runs in its own fresh process. Without clear_refs it falls back to ru_maxrss, the peak of the
    whole process life (setup included), and says so in probe.method.
    """

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.startswith("cuda"):
            synchronize(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.base = read_proc_status()["VmRSS"]
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "RSS high-water mark after clear_refs"
        except OSError:
            self.method = "ru_maxrss (peak of the whole process, setup included)"
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("ru_maxrss"):
            import resource

            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            self.peak = read_proc_status()["VmHWM"]
        self.extra = self.peak - self.base
        return False


# ----------------------------------------------------------------------------------------------------------
# The two sides: models from the same checkpoint folder, and their training steps.

def quiet_transformers():
    """transformers and peft, imported with their progress bars and deprecation warnings off."""
    try:
        import peft
        import transformers
    except ImportError as e:
        raise UserError(f"bench.py compares against transformers and peft ({e.name} is missing): "
                        f"pip install -r requirements-dev.txt") from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    return transformers, peft


def write_checkpoint(folder, shape, seed=0):
    """A random GPT2LMHeadModel of the named shape (gpt2, gpt2-medium, tiny), dropout 0 and no eos token (every
    generation runs its full length on both sides), saved with save_pretrained into folder."""
    transformers, _ = quiet_transformers()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**SHAPES[shape], vocab_size=50257, n_positions=1024, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=EOT, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def autocast_for(device, bf16):
    """bf16 autocast on a GPU (what train.py does there); fp32 without autocast on CPU."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)


class OurTrainer:
    """lora-gpt as train.py runs it: r=4 on q and v, loss on the completion only, AdamW on the LoRA weights."""

    name = "ours"

    def __init__(self, folder, device, bf16=False, compile=False, full=False, seed=0):
        torch.manual_seed(seed)
        self.model = GPT.from_pretrained(folder)
        if not full:
            apply_lora(self.model, LoRAConfig(**LORA, targets=("q", "v")))
        self.model.to(device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.forward = compile_for_training(self.model) if compile else self.model
        self.device, self.autocast = device, autocast_for(device, bf16)

    def step(self, batch):
        """One optimizer step on batch; returns the loss (mean over its targets)."""
        x, y = batch["x"].to(self.device), batch["y"].to(self.device)
        with self.autocast:
            _, loss = self.forward(x, y, label_smoothing=LABEL_SMOOTHING)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class PeftTrainer:
    """transformers' GPT2LMHeadModel + PEFT LoRA as a user would set it up: r=4, alpha 32, dropout 0.1 on c_attn
    (PEFT cannot adapt only the q and v thirds of the fused matrix, so q, k and v share one A and B), the loss
    computed from the logits with label smoothing as Trainer's label smoother does, AdamW on the LoRA weights."""

    name = "theirs"

    def __init__(self, folder, device, bf16=False, compile=False, seed=0):
        transformers, peft = quiet_transformers()
        torch.manual_seed(seed)
        base = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
        config = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
        self.model = peft.get_peft_model(base, config).to(device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.forward = torch.compile(self.model) if compile else self.model
        self.device, self.autocast = device, autocast_for(device, bf16)

    def step(self, batch):
        x = batch["x"].to(self.device)
        labels = hf_labels(batch["y"]).to(self.device)
        with self.autocast:
            logits = self.forward(input_ids=x, attention_mask=batch["mask"].to(self.device)).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                   ignore_index=-100, label_smoothing=LABEL_SMOOTHING, reduction="sum")
            loss = loss / batch["n_targets"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def make_trainer(side, folder, device, bf16=False, compile=False):
    """'ours' (LoRA), 'full' (ours, every weight trained) or 'theirs' (PEFT)."""
    if side == "theirs":
        return PeftTrainer(folder, device, bf16, compile)
    return OurTrainer(folder, device, bf16, compile, full=side == "full")


# ----------------------------------------------------------------------------------------------------------
# Data: the same batches and prompts for every side.

def e2e_split(workdir):
    """The E2E dev set, prepared into workdir from the shared CSV, or a synthetic split when it is not here.
    Returns (split, description)."""
    csv = SHARED / "e2e" / "devset.csv"
    if csv.is_file():
        if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")
        try:
            prepare.prepare(workdir, source=csv.parent, splits=("dev",))
            return batches.load_split(workdir, "dev"), "E2E dev set"
        except UserError as e:
            print(f"(E2E dev set not usable: {e}; using synthetic lengths)")
    return synthetic_split(4672), "synthetic E2E-like lengths"


def make_batches(split, n_batches, batch_size, seed=0):
    """n_batches random batches of the split, as train.py draws them (no length bucketing): dicts of x, y
    (batches.make_batch), the attention mask, the number of targets and of real (non-padding) input tokens."""
    made = []
    for indices in batches.batch_order(split, batch_size, seed, epoch=0)[:n_batches]:
        x, y = batches.make_batch(split, indices)
        lengths = split.lengths[indices] - 1  # input tokens per row: the example without its last token
        made.append(dict(x=x, y=y, mask=attention_mask(lengths, x.size(1)), lengths=lengths,
                         n_targets=batches.target_count(split, indices), n_tokens=int(lengths.sum())))
    return made


def same_length_prompts(split, count):
    """`count` distinct prompts of the split that have the same number of tokens (the most common prompt
    length), as a LongTensor (count, length): greedy generation of a batch without padding."""
    length = Counter(split.prompt_lens.tolist()).most_common(1)[0][0]
    prompts, seen = [], set()
    for i in np.flatnonzero(split.prompt_lens == length):
        tokens = split.tokens[split.offsets[i]:split.offsets[i + 1]].astype(np.int64)
        key = tuple(tokens[:length])
        if key not in seen:
            seen.add(key)
            prompts.append(tokens[:length])
        if len(prompts) == count:
            break
    while len(prompts) < count:  # a split with too few distinct prompts: repeat them
        prompts.append(prompts[len(prompts) % len(seen)])
    return torch.from_numpy(np.stack(prompts))


class Workspace:
    """What the sections share: the options, a temporary folder, the checkpoints written so far, the data."""

    def __init__(self, args, tmp):
        self.args, self.tmp = args, Path(tmp)
        self.device = args.device
        self.bf16 = args.device.startswith("cuda")
        self.repeats = 2 if args.quick else args.repeats
        # torch.compile compiles again for the first few new shapes: those steps are warm-up too
        self.warmup = max(1 if args.quick else 2, 3 if args.compile else 0)
        self.new_tokens = 16 if args.quick else NEW_TOKENS
        self.split, self.data_name = e2e_split(self.tmp / "e2e")
        self.batches = make_batches(self.split, N_BATCHES, BATCH_SIZE)
        self.mean_tokens = float((self.split.lengths - 1).mean())  # tokens counted per example, as train.py
        self.results = {}  # section 1's training times, reused by section 5
        self._folders = {}

    def checkpoint(self, shape):
        """The folder of the random checkpoint of this shape, written on first use."""
        if shape not in self._folders:
            self._folders[shape] = write_checkpoint(self.tmp / shape, shape)
        return self._folders[shape]

    def batch_file(self):
        """The batches saved for child processes (written once)."""
        path = self.tmp / "batches.pt"
        if not path.exists():
            torch.save(self.batches, path)
        return path


def measure_memory_in_child(ws, side, shape, steps):
    """Peak memory of `steps` training steps of one side, in a fresh process (see child_main)."""
    spec = dict(side=side, folder=str(ws.checkpoint(shape)), batches=str(ws.batch_file()), steps=steps,
                device=ws.device, bf16=ws.bf16, threads=torch.get_num_threads())
    done = subprocess.run([sys.executable, "-m", "tools.bench", "--_child", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory child for {side} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def child_main(spec):
    """In a child process: set up one side (model, optimizer, batches), then measure `steps` training steps on
    the longest batch. Prints RESULT {json}."""
    spec = json.loads(spec)
    torch.set_num_threads(spec["threads"])
    batches = torch.load(spec["batches"], weights_only=False)
    batch = max(batches, key=lambda b: b["x"].size(1))  # the longest: the step that needs the most memory
    trainer = make_trainer(spec["side"], spec["folder"], spec["device"], spec["bf16"])
    # transformers maps the checkpoint file and reads a weight's pages only when first used: read them all now,
    # so that they count in the set-up memory (as ours, copied in by from_pretrained, do) and not in the steps'.
    with torch.no_grad():
        for tensor in trainer.model.state_dict().values():
            tensor.sum()
    with MemoryProbe(spec["device"]) as probe:
        for _ in range(spec["steps"]):
            trainer.step(batch)
    n_trainable = sum(p.numel() for p in trainer.params)
    print("RESULT " + json.dumps(dict(base=probe.base, peak=probe.peak, extra=probe.extra, method=probe.method,
                                      trainable=n_trainable)))


# ----------------------------------------------------------------------------------------------------------
# The sections. Each returns (title, notes, rows) for section_text.

def compare_training(ws, shape):
    """Alternated training steps, ours vs PEFT, on the same batches; returns times, tokens and losses."""
    folder = ws.checkpoint(shape)
    ours = make_trainer("ours", folder, ws.device, ws.bf16, ws.args.compile)
    theirs = make_trainer("theirs", folder, ws.device, ws.bf16, ws.args.compile)
    losses = {"ours": [], "theirs": []}
    batches = ws.batches

    def side(trainer):
        return lambda i: losses[trainer.name].append(trainer.step(batches[i % len(batches)]))

    times = alternate({"ours": side(ours), "theirs": side(theirs)}, ws.repeats, ws.warmup, ws.device)
    # the first step of both sides ran on batches[0] with B = 0: the same model, so the same loss
    first = losses["ours"][0], losses["theirs"][0]
    tolerance = 2e-2 if ws.bf16 else 1e-4
    if abs(first[0] - first[1]) > tolerance * abs(first[1]):
        raise RuntimeError(f"the two sides' first-step losses differ ({first[0]:.6f} vs {first[1]:.6f}): "
                           f"they are not computing the same thing")
    timed = [batches[(ws.warmup + r) % len(batches)] for r in range(ws.repeats)]  # the batch of each round
    trainable = {t.name: sum(p.numel() for p in t.params) for t in (ours, theirs)}
    del ours, theirs
    gc.collect()
    return dict(times=times, batches=timed, tokens=[b["n_tokens"] for b in timed], first=first, trainable=trainable)


def tokens_per_s(times, tokens):
    return statistics.median(n / t for n, t in zip(tokens, times, strict=True))


def section_training(ws):
    """1. A LoRA training step, GPT-2 124M shape: tokens/s and peak memory, ours vs PEFT."""
    run = compare_training(ws, "gpt2")
    ws.results["gpt2"] = run
    times, tokens = run["times"], run["tokens"]
    steps = 2 if ws.args.quick else 3
    mem = {side: measure_memory_in_child(ws, side, "gpt2", steps) for side in ("ours", "theirs")}
    rows = [
        dict(what=f"training tokens/s (median of {ws.repeats} steps)", ours=tokens_per_s(times["ours"], tokens),
             theirs=tokens_per_s(times["theirs"], tokens), ratio=paired_ratios(times["theirs"], times["ours"]),
             target=(">=", 1.2)),
        dict(what="step time, ms (median)", ours=1e3 * statistics.median(times["ours"]),
             theirs=1e3 * statistics.median(times["theirs"]),
             ratio=paired_ratios(times["ours"], times["theirs"])),
        dict(what=f"peak memory of {steps} steps above the set-up model, MiB", ours=mem["ours"]["extra"] / MIB,
             theirs=mem["theirs"]["extra"] / MIB, ratio=mem["ours"]["extra"] / mem["theirs"]["extra"],
             target=("<=", 0.9)),
        dict(what="peak memory of the process during those steps, MiB", ours=mem["ours"]["peak"] / MIB,
             theirs=mem["theirs"]["peak"] / MIB, ratio=mem["ours"]["peak"] / mem["theirs"]["peak"]),
        dict(what="first-step loss (same weights, same batch: a sanity check)", ours=run["first"][0],
             theirs=run["first"][1], digits=5, ratio=run["first"][0] / run["first"][1], ratio_digits=6),
        dict(what="trainable parameters", ours=run["trainable"]["ours"], theirs=run["trainable"]["theirs"],
             ratio=run["trainable"]["ours"] / run["trainable"]["theirs"]),
    ]
    padded = sum(b["x"].numel() for b in ws.batches) / sum(b["n_tokens"] for b in ws.batches)
    notes = [
        f"ours: GPT.loss (head only where a target is) + AdamW on A, B of r=4 on Wq and Wv. theirs: "
        f"GPT2LMHeadModel + PEFT LoRA r=4 on the fused c_attn (q, k, v share one A, B: PEFT cannot adapt only "
        f"thirds of a fused matrix), attention_mask passed, loss = F.cross_entropy(logits, labels with -100, "
        f"label_smoothing=0.1) over all positions, as Trainer's label smoother does. Both: alpha 32, LoRA dropout "
        f"0.1, AdamW lr {LR} wd {WEIGHT_DECAY}, dropout 0, {_precision(ws)}.",
        f"batches of {BATCH_SIZE} from the {ws.data_name}, padded to their longest ({padded:.2f} padded positions "
        f"per real token); tokens/s counts real input tokens. Ratios are the median of per-step ratios on the "
        f"same batch (ours/theirs for tokens/s, so > 1 is faster).",
        f"memory: {mem['ours']['method']}; each side in its own child process (no torch.compile), {steps} steps "
        f"on the longest batch ({max(b['x'].size(1) for b in ws.batches)} positions) after the model, optimizer "
        f"and batch are set up (set-up RSS ours {mem['ours']['base'] / MIB:,.0f} MiB, theirs "
        f"{mem['theirs']['base'] / MIB:,.0f} MiB).",
    ]
    return "1. LoRA training step, GPT-2 124M shape, batch 8, r=4: lora-gpt vs transformers + PEFT", notes, rows


def section_full_memory(ws):
    """2. Peak memory of LoRA vs full fine-tuning, GPT-2 medium shape (both lora-gpt)."""
    steps = 2
    mem = {side: measure_memory_in_child(ws, side, "gpt2-medium", steps) for side in ("ours", "full")}
    rows = [
        dict(what=f"peak memory of {steps} steps above the set-up model, MiB", ours=mem["ours"]["extra"] / MIB,
             theirs=mem["full"]["extra"] / MIB, ratio=mem["ours"]["extra"] / mem["full"]["extra"],
             target=("<=", 0.5)),
        dict(what="peak memory of the process (weights included), MiB", ours=mem["ours"]["peak"] / MIB,
             theirs=mem["full"]["peak"] / MIB, ratio=mem["ours"]["peak"] / mem["full"]["peak"],
             target=("<=", 0.5)),
        dict(what="trainable parameters", ours=mem["ours"]["trainable"], theirs=mem["full"]["trainable"],
             ratio=mem["ours"]["trainable"] / mem["full"]["trainable"], ratio_digits=5),
    ]
    notes = [
        "ours: LoRA r=4 on Wq, Wv; theirs: the same model with every weight trained (full fine-tuning), both "
        f"AdamW (torch defaults), the same loss, {_precision(ws)}.",
        f"memory: {mem['ours']['method']}, each side in its own child process, {steps} steps (the second holds "
        f"gradients and AdamW's two moments of every trained weight) on the longest batch of {BATCH_SIZE}.",
    ]
    return "2. Peak memory, LoRA vs full fine-tuning, GPT-2 medium shape (lora-gpt both)", notes, rows


def greedy_runner(model, prompts, ws, use_cache=True):
    """function(max_new) -> the greedy continuation of prompts by our model or transformers' (a GPT2LMHeadModel)."""
    def run(max_new):
        with torch.no_grad(), autocast_for(ws.device, ws.bf16):
            if isinstance(model, GPT):
                return model.generate(prompts, max_new, temperature=0, use_cache=use_cache)
            return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                  max_new_tokens=max_new, pad_token_id=EOT)
    return run


def time_generation(ws, runners, slow, slow_rounds):
    """Alternated timed generations of ws.new_tokens tokens: every runner in ws.repeats rounds, except `slow`,
    which runs only in the first slow_rounds of them. Returns ({name: [seconds]}, {name: last output})."""
    outputs = {}

    def side(name):
        def call(i):
            outputs[name] = runners[name](ws.new_tokens)
        return call

    for run in runners.values():  # warm-up: a short generation each, untimed
        run(8)
    times = alternate({name: side(name) for name in runners}, slow_rounds, 0, ws.device)
    rest = alternate({name: side(name) for name in runners if name != slow}, ws.repeats - slow_rounds, 0, ws.device)
    for name, extra in rest.items():
        times[name] += extra
    return times, outputs


def section_generation(ws):
    """3. Greedy generation of ws.new_tokens tokens at batch 1 and 8: our KV cache vs our no-cache path vs
    transformers' generate."""
    transformers, _ = quiet_transformers()
    folder = ws.checkpoint("gpt2")
    ours = GPT.from_pretrained(folder).to(ws.device).eval()
    fast = transposed_weights(GPT.from_pretrained(folder)).to(ws.device).eval()  # the opt-in layout
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(ws.device).eval()
    # bf16 weights, as sample.py --dtype bf16 gives them: half the bytes per token; fast only on a processor with
    # bf16 arithmetic (AVX512-BF16, AMX, a GPU), so it is measured against transformers in bf16 too
    ours16 = GPT.from_pretrained(folder).to(device=ws.device, dtype=torch.bfloat16).eval()
    hf16 = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.bfloat16).to(ws.device).eval()
    rows, notes = [], []
    bandwidth, n_bytes = read_bandwidth(ws.device), decode_bytes(ours)  # measured now, in this run
    limit = bandwidth / n_bytes  # tokens/s at batch 1 if the weights streamed at the rate a sum reads memory
    for batch in (1, BATCH_SIZE):
        prompts = same_length_prompts(ws.split, batch).to(ws.device)
        packed = None  # the other opt-in: MKL's packed GEMM for `batch` rows, where this PyTorch has MKL
        if ws.device == "cpu" and torch.backends.mkl.is_available():
            packed = packed_weights(GPT.from_pretrained(folder).eval(), batch)
        runners = {"KV cache": greedy_runner(ours, prompts, ws), "transformers": greedy_runner(hf, prompts, ws),
                   "fast_decode": greedy_runner(fast, prompts, ws), "bf16": greedy_runner(ours16, prompts, ws),
                   "transformers bf16": greedy_runner(hf16, prompts, ws),
                   "no cache": greedy_runner(ours, prompts, ws, use_cache=False)}
        if packed is not None:
            runners["packed"] = greedy_runner(packed, prompts, ws)
        if ws.args.compile:  # torch.compile of the whole forward, one graph for every cache length (dynamic)
            compiled = GPT.from_pretrained(folder).to(ws.device).eval()
            compiled.forward = torch.compile(compiled.forward, dynamic=True)
            runners["compiled"] = greedy_runner(compiled, prompts, ws)
        # The no-cache path reruns the whole sequence every step: at batch 8 one run takes ~100 s on 2 CPU cores,
        # so there it runs in one round only (its margin is large); the other two run in every round.
        slow_rounds = ws.repeats if batch == 1 or ws.device.startswith("cuda") else 1
        times, outputs = time_generation(ws, runners, "no cache", slow_rounds)
        tok = batch * ws.new_tokens
        speed = {name: tok / statistics.median(t) for name, t in times.items()}
        rows += [
            dict(what=f"batch {batch}: KV cache vs transformers generate, new tokens/s (median of {ws.repeats})",
                 ours=speed["KV cache"], theirs=speed["transformers"],
                 ratio=paired_ratios(times["transformers"], times["KV cache"]), target=(">=", 1.5)),
            dict(what=f"batch {batch}: KV cache vs our no-cache path, new tokens/s (median of {slow_rounds})",
                 ours=speed["KV cache"], theirs=speed["no cache"],
                 ratio=paired_ratios(times["no cache"], times["KV cache"][:slow_rounds]), target=(">=", 5.0)),
        ]
        rows.append(dict(what=f"batch {batch}: tools.fast_decode's transposed layout (opt-in) vs the plain KV "
                              f"cache, new tokens/s", ours=speed["fast_decode"], theirs=speed["KV cache"],
                         ratio=paired_ratios(times["KV cache"], times["fast_decode"])))
        if packed is not None:
            rows.append(dict(what=f"batch {batch}: tools.fast_decode's packed weights (opt-in, MKL packed GEMM for "
                                  f"{batch} rows) vs transformers generate, new tokens/s", ours=speed["packed"],
                             theirs=speed["transformers"], ratio=paired_ratios(times["transformers"], times["packed"]),
                             target=(">=", 1.5)))
        if "compiled" in runners:
            rows.append(dict(what=f"batch {batch}: torch.compile(forward, dynamic=True) vs the plain KV cache, new "
                                  f"tokens/s", ours=speed["compiled"], theirs=speed["KV cache"],
                             ratio=paired_ratios(times["KV cache"], times["compiled"])))
        rows.append(dict(what=f"batch {batch}: bf16 weights (sample.py --dtype bf16) vs transformers in bf16, new "
                              f"tokens/s", ours=speed["bf16"], theirs=speed["transformers bf16"],
                         ratio=paired_ratios(times["transformers bf16"], times["bf16"])))
        rows.append(dict(what=f"batch {batch}: bf16 weights vs our fp32 KV cache, new tokens/s", ours=speed["bf16"],
                         theirs=speed["KV cache"], ratio=paired_ratios(times["KV cache"], times["bf16"])))
        if batch == 1:
            rows.append(dict(what=f"batch 1: bf16 weights vs their memory-bandwidth limit ({bandwidth / 1e9:.1f} GB/s "
                                  f"/ {n_bytes / 2e6:.0f} MB per token), tokens/s", ours=speed["bf16"],
                             theirs=2 * limit, ratio=speed["bf16"] / (2 * limit)))
            for name in ("KV cache", "fast_decode") + (("packed",) if packed is not None else ()):
                rows.append(dict(what=f"batch 1: {name} vs the memory-bandwidth limit ({bandwidth / 1e9:.1f} GB/s / "
                                      f"{n_bytes / 1e6:.0f} MB per token), tokens/s", ours=speed[name],
                                 theirs=limit, ratio=speed[name] / limit, target=(">=", 0.7)))
        same = {name: "yes" if torch.equal(outputs[name], outputs["KV cache"]) else "NO"
                for name in ("transformers", "no cache", "fast_decode", "packed", "compiled") if name in outputs}
        notes.append(f"batch {batch}: the same greedy tokens as our KV cache path: transformers "
                     f"{same['transformers']}, our no-cache path {same['no cache']}, fast_decode "
                     f"{same['fast_decode']}, packed {same.get('packed', 'not run (no MKL)')}"
                     f"{', compiled ' + same['compiled'] if 'compiled' in same else ''}; bf16 weights the "
                     f"same as transformers in bf16: "
                     f"{'yes' if torch.equal(outputs['bf16'], outputs['transformers bf16']) else 'NO'}.")
    length = same_length_prompts(ws.split, 1).size(1)
    notes.insert(0, f"greedy, {ws.new_tokens} new tokens after {length}-token prompts ({ws.data_name}: distinct "
                    f"prompts of the most common length, so no padding), no eos stop, {_precision(ws)}; transformers: "
                    f"GPT2LMHeadModel.generate(do_sample=False), its default KV cache. Ratios: median of per-round "
                    f"ratios, ours/theirs in tokens/s.")
    notes.insert(1, f"bandwidth limit: one token at batch 1 reads every weight once ({n_bytes / 1e6:.0f} MB: the tied "
                    f"head reads wte whole); memory read rate {bandwidth / 1e9:.1f} GB/s measured in this run as the "
                    f"best of 5 sums over a 1 GiB fp32 tensor, so the limit is {limit:.1f} tokens/s.")
    return "3. Greedy generation, GPT-2 124M shape: our KV cache vs transformers' generate and our no-cache path", \
        notes, rows


def beam_prompts(ws, count):
    """The prompts (paper format) of the first `count` E2E test MRs when ../shared has the test CSV, else distinct
    prompts of ws.split (synthetic, or the dev set). Returns (prompts as lists of token ids, description)."""
    csv = SHARED / "e2e" / "testset_w_refs.csv"
    if csv.is_file():
        with contextlib.suppress(UserError):
            prepare.prepare(ws.tmp / "e2e", source=csv.parent, splits=("test",))
            enc = tasks.get_tokenizer()
            mrs = [item["mr"] for item in prepare.load_mrs(ws.tmp / "e2e", "test")[:count]]
            return [prepare.prompt_tokens(enc, mr, "paper") for mr in mrs], "E2E test MRs"
    prompts, seen = [], set()
    for i in range(len(ws.split)):
        start = ws.split.offsets[i]
        prompt = tuple(ws.split.tokens[start:start + ws.split.prompt_lens[i]].tolist())
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(list(prompt))
        if len(prompts) == count:
            break
    return prompts, f"{ws.data_name} prompts"


def beam_runners(ours, hf, prompts, options):
    """function(i) -> the answers (lists of new tokens) for every prompt: our batched decoding as eval.py runs it
    (left-padded batches of BEAM_BATCH), our one-prompt loop, and transformers' beam generate on the same
    batches, left-padded with an attention mask."""
    groups = prompt_batches(prompts, BEAM_BATCH, options["max_new_tokens"], ours.config.block_size)

    def batched(i):
        answers = [None] * len(prompts)
        for group in groups:
            for j, answer in zip(group, beam_search_batch(ours, [prompts[j] for j in group], **options), strict=True):
                answers[j] = answer
        return answers

    def one_by_one(i):
        return [beam_search(ours, prompt, **options) for prompt in prompts]

    def transformers_generate(i):
        answers = [None] * len(prompts)
        for group in groups:
            width = max(len(prompts[j]) for j in group)
            device = hf.device
            x = torch.tensor([[EOT] * (width - len(prompts[j])) + prompts[j] for j in group], device=device)
            mask = torch.tensor([[0] * (width - len(prompts[j])) + [1] * len(prompts[j]) for j in group],
                                device=device)
            with torch.no_grad():
                out = hf.generate(input_ids=x, attention_mask=mask, num_beams=options["beam"],
                                  no_repeat_ngram_size=options["no_repeat_ngram"], do_sample=False,
                                  length_penalty=options["length_penalty"], max_new_tokens=options["max_new_tokens"],
                                  eos_token_id=[EOT, NEWLINES], pad_token_id=EOT)
            for j, row in zip(group, out[:, x.size(1):].tolist(), strict=True):
                answers[j] = [t for t in row if t not in (EOT, NEWLINES)]  # their padding and end token dropped
        return answers

    return {"batched": batched, "one by one": one_by_one, "transformers": transformers_generate}


def section_beam(ws):
    """6. Beam search over many MRs (eval.py's decoding) vs our one-prompt loop and transformers' beam generate."""
    transformers, _ = quiet_transformers()
    folder = ws.checkpoint("tiny")
    ours = GPT.from_pretrained(folder).to(ws.device).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(ws.device).eval()
    count = 8 if ws.args.quick else BEAM_MRS
    options = dict(BEAM, max_new_tokens=8 if ws.args.quick else BEAM["max_new_tokens"])
    prompts, source = beam_prompts(ws, count)
    runners = beam_runners(ours, hf, prompts, options)
    warm = beam_runners(ours, hf, prompts[:2], dict(options, max_new_tokens=2))
    for run in warm.values():
        run(0)
    outputs = {}
    sides = {name: (lambda i, name=name: outputs.__setitem__(name, runners[name](i))) for name in runners}
    rounds = 1 if ws.args.quick else min(ws.repeats, 2)
    times = alternate(sides, rounds, 0, ws.device)
    speed = {name: len(prompts) / statistics.median(t) for name, t in times.items()}
    rows = [
        dict(what=f"{len(prompts)} MRs: batched ({BEAM_BATCH} MRs a forward) vs one MR at a time, MRs/s",
             ours=speed["batched"], theirs=speed["one by one"],
             ratio=paired_ratios(times["one by one"], times["batched"]), target=(">=", 5.0), digits=2),
        dict(what=f"{len(prompts)} MRs: batched vs transformers generate(num_beams={options['beam']}) on the same "
                  f"groups (its rules differ), MRs/s", ours=speed["batched"], theirs=speed["transformers"],
             ratio=paired_ratios(times["transformers"], times["batched"]), target=(">=", 2.0), digits=2),
    ]
    same = sum(a == b for a, b in zip(outputs["batched"], outputs["one by one"], strict=True))
    theirs = sum(a == b for a, b in zip(outputs["batched"], outputs["transformers"], strict=True))
    notes = [
        f"{source}, beam {options['beam']}, {options['max_new_tokens']} new tokens, length penalty "
        f"{options['length_penalty']}, no repeated {options['no_repeat_ngram']}-gram, on the tiny model "
        f"({SHAPES['tiny']}, vocabulary 50,257, random weights: few hypotheses end, so nearly every step runs), "
        f"fp32 on {ws.device}; median of {rounds} alternated round(s).",
        f"batched: beam.beam_search_batch on batches of {BEAM_BATCH} prompts, shortest first, left-padded "
        f"(eval.py --beam_batch {BEAM_BATCH}); one by one: beam.beam_search per MR (eval.py's loop before).",
        f"the same answers batched as one by one: {same} of {len(prompts)} MRs. transformers' generate(num_beams, "
        f"no_repeat_ngram_size, length_penalty, eos [50256, 628]) follows its own rules (2 x beam candidates, the "
        f"ban counts the prompt and comes after the softmax, its own length normalisation and stopping rule): "
        f"the same answer on {theirs} of {len(prompts)}.",
    ]
    return "6. Beam search over many MRs, tiny model: batched vs one MR at a time vs transformers", notes, rows


def forward_runner(model, x, ws):
    """function(i) -> model(x)'s logits, in eval mode without gradients."""
    def call(i):
        with torch.no_grad(), autocast_for(ws.device, ws.bf16):
            return model(x)[0]
    return call


def section_forward(ws):
    """4. Forward latency (all logits, no grad): base vs merged vs unmerged LoRA model."""
    folder = ws.checkpoint("gpt2")
    base = GPT.from_pretrained(folder)
    unmerged = apply_lora(GPT.from_pretrained(folder), LoRAConfig(**LORA, targets=("q", "v")))
    merged = apply_lora(GPT.from_pretrained(folder), LoRAConfig(**LORA, targets=("q", "v")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so merging really changes the weights
        for p in lora_state_dict(unmerged).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for name, p in lora_state_dict(merged).items():
            p.copy_(lora_state_dict(unmerged)[name])
    merge_lora(merged)
    models = {"base": base, "merged": merged, "unmerged": unmerged}
    for m in models.values():
        m.to(ws.device).eval()
    rows, notes = [], []
    for batch_size in (1, BATCH_SIZE):
        full = ws.batches[0]
        x = (full["x"][:1, : int(full["lengths"][0])] if batch_size == 1 else full["x"]).to(ws.device)

        repeats = ws.repeats * (6 if batch_size == 1 else 3)  # short calls: more rounds for the same time
        times = alternate({name: forward_runner(m, x, ws) for name, m in models.items()}, repeats, ws.warmup, ws.device)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        rows += [
            dict(what=f"batch {batch_size} x {x.size(1)} tokens: merged LoRA vs base, ms (median of {repeats})",
                 ours=ms["merged"], theirs=ms["base"], digits=2,
                 ratio=paired_ratios(times["merged"], times["base"]), target=("<=", 1.02)),
            dict(what=f"batch {batch_size} x {x.size(1)} tokens: unmerged LoRA vs base, ms", ours=ms["unmerged"],
                 theirs=ms["base"], digits=2, ratio=paired_ratios(times["unmerged"], times["base"])),
        ]
        logits = {name: forward_runner(models[name], x, ws)(0).float() for name in ("merged", "unmerged")}
        diff = (logits["merged"] - logits["unmerged"]).abs().max().item()
        notes.append(f"batch {batch_size}: merged vs unmerged logits differ by at most {diff:.2e}.")
    notes.insert(0, f"lora-gpt alone: GPT (no LoRA) vs the same with r=4 on Wq, Wv (B random, not zero), merged "
                    f"(merge_lora) or not; model(x) in eval mode, no grad, all logits, {_precision(ws)}. Ratios are "
                    f"latency ratios (< 1 is faster), median of per-round ratios.")
    return "4. Forward latency, GPT-2 124M shape: base vs merged vs unmerged LoRA (lora-gpt)", notes, rows


def section_gpu(ws):
    """5. MFU of the training step against the GPU's peak bf16 rate, and E2E epoch time for GPT-2 medium."""
    peak = peak_tflops(torch.cuda.get_device_name(ws.device) if ws.device.startswith("cuda") else "",
                       ws.args.peak_tflops)
    rows = []
    for shape in ("gpt2", "gpt2-medium"):
        run = ws.results.get(shape) or compare_training(ws, shape)
        cfg = PRETRAINED[shape]
        n_lora = run["trainable"]["ours"]
        times, tokens = run["times"], run["tokens"]
        flops = [lora_train_flops(cfg["n_layer"], cfg["n_embd"], 50257, b["lengths"], b["n_targets"], n_lora)
                 for b in run["batches"]]
        mfu = {side: statistics.median(f / t for f, t in zip(flops, times[side], strict=True)) / (peak * 1e12)
               if peak else None for side in ("ours", "theirs")}
        speed = {side: tokens_per_s(times[side], tokens) for side in ("ours", "theirs")}
        rows += [
            dict(what=f"{shape}: training tokens/s", ours=speed["ours"], theirs=speed["theirs"],
                 ratio=paired_ratios(times["theirs"], times["ours"])),
            dict(what=f"{shape}: MFU, % of {peak or '?'} TFLOP/s",
                 ours=None if peak is None else 100 * mfu["ours"], theirs=None if peak is None else 100 * mfu["theirs"],
                 digits=1, ratio=None if peak is None else mfu["ours"] / mfu["theirs"]),
        ]
        if shape == "gpt2-medium":
            hours = {side: E2E_TRAIN_EXAMPLES * ws.mean_tokens / speed[side] / 3600 for side in speed}
            rows.append(dict(what="gpt2-medium: one E2E epoch, hours (estimate)", ours=hours["ours"],
                             theirs=hours["theirs"], digits=2, ratio=hours["ours"] / hours["theirs"]))
    notes = [
        f"the section 1 setting on {ws.device} ({_precision(ws)}{', torch.compile' if ws.args.compile else ''}); "
        f"gpt2-medium measured here the same way.",
        "MFU = useful FLOPs per step / step time / peak. Useful FLOPs (the same for both sides): per real token "
        "4 N_body (forward + input gradient of frozen weights; no weight gradients) with N_body = 12 L d^2, "
        "+ 6 N_lora, + attention 12 L d n (n = the sequence's length, no causal halving), + the head 4 d V per "
        "target token only. Peak: H100/H200 SXM 989, A100 312 TFLOP/s dense bf16, or --peak_tflops.",
        f"epoch = {E2E_TRAIN_EXAMPLES:,} training examples x {ws.mean_tokens:.1f} tokens each (mean of the "
        f"{ws.data_name}) / training tokens/s, batch {BATCH_SIZE}, no length bucketing.",
    ]
    return "5. MFU against the peak bf16 rate, and E2E epoch time for GPT-2 medium", notes, rows


def _precision(ws):
    return "bf16 autocast" if ws.bf16 else "fp32"


SECTIONS = {1: section_training, 2: section_full_memory, 3: section_generation, 4: section_forward, 5: section_gpu,
            6: section_beam}


# ----------------------------------------------------------------------------------------------------------
# The report.

def machine_line(device, threads):
    """Date, CPU model, cores, library versions and the device, for the report's header."""
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""
    return (f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {cpu}, {os.cpu_count()} cores, {threads} torch threads | "
            f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__} | "
            f"device {device}{gpu}")


def section_text(title, notes, rows):
    """One section as markdown: its heading, its table, its notes (what is printed and what --write keeps)."""
    return "\n".join([f"### {title}", "", markdown_table(rows), "", *(f"- {note}" for note in notes)])


def load_average():
    """The machine's 1-minute load average (runnable processes), or None where the OS does not say."""
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None


def page_text(command, machine, sections, wall_s, loads=(None, None)):
    """The performance page --write makes: the command that wrote it, the machine, the sections; no hand edits.
    loads: the 1-minute load average at the start and at the end, so that a reader sees whether other work
    shared the CPU."""
    load = ("" if None in loads else f"; load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end "
            f"({os.cpu_count()} cores: above that, other work shared the CPU)")
    head = ["# Performance", "",
            "This page is written by `tools/bench.py`; every figure below comes from the run it names. To",
            "refresh it, run the command again with `--force` (which replaces this page); do not edit it by hand.", "",
            "```bash", command, "```", "",
            f"Measured: {machine}; wall time {wall_s:.0f} s{load}.", "",
            "How to read it: each comparison runs both sides in one process on the same weights and inputs,",
            "alternated after untimed warm-up calls; a figure is a median and a ratio the median of per-round",
            "ratios; memory is measured with each side in its own child process. Compare ratios, not absolute",
            "figures, across runs and machines.", ""]
    return "\n".join(head + [text + "\n" for text in sections])


def check_page(path, force):
    """Refuse --write before any measuring where the page cannot be written or would replace one without --force
    (plumbing.outputs.check_file, as every command checks its output)."""
    outputs.check_file(path, force)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Speed and memory of lora-gpt against transformers + PEFT, as ratios "
                                "measured in one run on the same weights and inputs.")
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, or e.g. cuda:0 "
                   "(default: %(default)s)")
    p.add_argument("--sections", nargs="+", type=int, choices=sorted(SECTIONS), default=None,
                   help="which sections to run (default 1-4 and 6, and 5 on CUDA or with --peak_tflops)")
    p.add_argument("--quick", action="store_true", help="2 rounds, 1 warm-up, 16 new tokens: a smoke test "
                   "(default: off)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (the median is "
                   "reported) (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides' training (section 1, 5), and a "
                   "compiled decode step beside the plain one (section 3) (default: off)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the device's peak bf16 TFLOP/s for MFU "
                   "(default: none, no MFU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process "
                   "may use)")
    p.add_argument("--write", type=Path, default=None, metavar="PAGE", help="also write the tables, the command, "
                   "the date, the CPU and the versions to this markdown page (e.g. docs/performance.md), when all "
                   "sections are done (default: print only)")
    p.add_argument("--force", action="store_true", help="with --write: replace the page if it exists (default: "
                   "refuse)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.sections is None:
        gpu = args.device.startswith("cuda") or args.peak_tflops is not None
        args.sections = [1, 2, 3, 4, 6] + ([5] if gpu else [])
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._child is not None:
        quiet_transformers()
        child_main(args._child)
        return
    threads = torch.get_num_threads()
    try:
        with reported():  # a mistake is one line, Ctrl-C exits 130, and no page is left half-written
            measure(args, argv)
    finally:
        torch.set_num_threads(threads)  # the caller's count again (bench sets its own for the timings)


def measure(args, argv):
    """Run the chosen sections, print each table, and write them as a page to --write."""
    if args.write is not None:
        check_page(args.write, args.force)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    start = time.perf_counter()
    quiet_transformers()
    machine, load_at_start = machine_line(args.device, torch.get_num_threads()), load_average()
    print(f"lora-gpt bench | {machine}")
    sections = []
    with tempfile.TemporaryDirectory(prefix="lora-gpt-bench-") as tmp:
        ws = Workspace(args, tmp)
        for number_ in sorted(set(args.sections)):
            sections.append(section_text(*SECTIONS[number_](ws)))
            print("\n" + sections[-1])
            sys.stdout.flush()
    wall_s = time.perf_counter() - start
    print(f"\nwall time {wall_s:.0f} s")
    if args.write is not None:
        command = "python -m tools.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        with outputs.file(args.write, args.force) as f:
            f.write(page_text(command, machine, sections, wall_s, (load_at_start, load_average())).encode())
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
