"""The checks of every part: each one runs the code on small random inputs and returns named numbers.

A check never looks at code. It is run twice, once on the instructor's copy (the expected numbers) and once
on a student's, and the two results are compared name by name (compare below). The inputs come from
explicit seeds and torch.Generator objects, and every weight that a student's code creates is overwritten
before it is used, so a correct solution written another way draws the same numbers.

A case is (part, check name, keyword arguments): assignments/cases.py holds the cases students see,
assignments/heldout.py the grader's other shapes and seeds. The project's modules are imported inside each
check, so that a module which does not import costs only the checks that need it.
"""

import contextlib
import json
import math
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from assignments.cases import CASE_SECONDS, PUBLIC, public_cases  # noqa: F401 (the starter's tests use it)

EXPECTED = Path(__file__).with_name("expected.pt")  # the public cases' numbers, written by assignments.make


def generator(seed):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize(module, g, std):
    """Every parameter drawn afresh from g, in name order (so the order a class creates them in does not
    matter), biases and LayerNorms too: a weight in the wrong place then changes the numbers."""
    for _, p in sorted(module.named_parameters()):
        p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_config(**shape):
    from model import GPTConfig

    return GPTConfig(**{"block_size": 32, "vocab_size": 97, "n_layer": 2, "n_head": 2, "n_embd": 16, **shape})


# ----------------------------------------------------------------------------------------------------------
# Part 0: GPT.from_pretrained


def load_random_checkpoint(seed, dropout, **shape):
    """(model, whether its name_or_path is the folder it came from): a random GPT-2 checkpoint written in OpenAI's
    layout (Conv1D weights (in, out)) and loaded with GPT.from_pretrained."""
    from model import GPT
    from plumbing import files, hf_checkpoint

    config = tiny_config(**shape)
    source = GPT(config)
    randomize(source, generator(seed), 0.05)
    with tempfile.TemporaryDirectory() as folder:
        state = {name: t.contiguous() for name, t in hf_checkpoint.hf_state_dict(source.state_dict()).items()}
        files.save_safetensors(state, Path(folder) / "model.safetensors")
        (Path(folder) / "config.json").write_text(json.dumps(hf_checkpoint.hf_config(config)))
        model = GPT.from_pretrained(folder, dropout=dropout)
        return model, model.name_or_path == str(folder)


def loading(seed, dropout=0.0, **shape):
    """Write a random GPT-2 checkpoint in OpenAI's layout (Conv1D weights (in, out)), load it."""
    model, _ = load_random_checkpoint(seed, dropout, **shape)
    out = {f"loaded {name}": t.detach().clone() for name, t in model.state_dict().items()}
    out["lm_head is wte (tied)"] = model.lm_head.weight is model.transformer.wte.weight
    out["config"] = repr(model.config)
    return out


def loading_for_training(seed, dropout, **shape):
    """GPT.from_pretrained as train.py uses it, with dropout: every Dropout of the loaded model has p = dropout
    (not only its config), and the model remembers where it came from."""
    import torch.nn as nn

    from model import CausalSelfAttention

    model, named = load_random_checkpoint(seed, dropout, **shape)
    rates = [(name, float(m.p)) for name, m in model.named_modules() if isinstance(m, nn.Dropout)]
    rates += [(f"{name}.attn_dropout", float(m.attn_dropout)) for name, m in model.named_modules()
              if isinstance(m, CausalSelfAttention)]
    return {"dropout of every module": sorted(rates),
            "name_or_path is the folder": named,
            "parameters (the tied head counted once)": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------------------------------------
# Part 1: CausalSelfAttention.forward, KVCache.store and KVCache.mask


def attention(seed, batch, n_head, n_embd, prompt, chunks, layer=1):
    """One attention layer on a whole sequence, then the same sequence fed through a KV cache: the prompt,
    then chunks of new positions (several at once, so the mask after a past is exercised)."""
    from model import CausalSelfAttention, KVCache

    total = prompt + sum(chunks)
    config = tiny_config(block_size=total + 3, n_head=n_head, n_embd=n_embd)
    g = generator(seed)
    attn = CausalSelfAttention(config).eval()
    randomize(attn, g, 0.3)
    x = torch.randn(batch, total, n_embd, generator=g)
    out = {}
    with torch.no_grad():
        out["whole sequence, no cache"] = attn(x)
        cache = KVCache(config, batch, total + 2, "cpu", torch.float32)
        start = 0
        for step, n in enumerate([prompt, *chunks]):
            out[f"cached step {step}: {n} new after {start}"] = attn(x[:, start:start + n], cache.mask(batch, n),
                                                                     cache, layer)
            start += n
            cache.length = start  # GPT.forward moves the cache on once every layer has stored its k, v
        out["cache keys"], out["cache values"] = cache.k.clone(), cache.v.clone()
    # training: the gradient flows back through attention
    attn.train()
    x.requires_grad_(True)
    (attn(x) ** 2).mean().backward()
    out["gradient wrt x"] = x.grad
    return out


def cache_store(seed, batch, n_head, head_size, steps):
    """KVCache.store alone: it writes after the past and returns every position so far."""
    from model import KVCache

    config = tiny_config(n_layer=3, n_head=n_head, n_embd=n_head * head_size)
    g = generator(seed)
    cache = KVCache(config, batch, sum(steps) + 1, "cpu", torch.float32)
    out = {}
    for i, n in enumerate(steps):
        k = torch.randn(batch, n_head, n, head_size, generator=g)
        v = torch.randn(batch, n_head, n, head_size, generator=g)
        keys, values = cache.store(2, k, v)
        out[f"step {i}: keys"], out[f"step {i}: values"] = keys.clone(), values.clone()
        cache.length += n
    out["buffers k"], out["buffers v"] = cache.k, cache.v
    return out


def cache_mask(pads, length, T):
    """KVCache.mask alone, on rows left-padded by `pads` after `length` filled slots, T new tokens: the slots each
    real token sees, exactly; a pad's row is the student's choice, but no row may be empty (a softmax over no
    slot is 0 on some kernels and NaN on others) and no token may see a later slot."""
    from model import KVCache

    B = len(pads)
    config = tiny_config(block_size=length + T + 1)
    cache = KVCache(config, B + 1, length + T + 1, "cpu", torch.float32, pad=[*pads, 0])  # the last row unused
    cache.length = length
    mask = cache.mask(B, T)
    out = {"shape": tuple(mask.shape), "dtype": str(mask.dtype)}
    if mask.dim() != 4 or mask.dtype != torch.bool:
        return out
    query = torch.arange(length, length + T)[:, None]
    key = torch.arange(length + T)[None, :]
    for b, pad in enumerate(pads):
        real = query[:, 0] >= pad
        out[f"row {b} (pad {pad}): the slots each real token sees"] = mask[b, 0, real]
    out["every query sees at least one slot"] = bool(mask.any(dim=-1).all())
    out["no query sees a later slot"] = not bool((mask & (key > query)).any())
    return out


def attention_padded(seed, n_head, n_embd, lengths, steps):
    """Prompts of different lengths left-padded on one cache (cache.pad), then one-token steps: each row's real
    positions (a pad's output is nobody's business) against that row run alone."""
    from model import CausalSelfAttention, KVCache

    width, total = max(lengths), max(lengths) + steps
    config = tiny_config(block_size=total + 1, n_head=n_head, n_embd=n_embd)
    g = generator(seed)
    attn = CausalSelfAttention(config).eval()
    randomize(attn, g, 0.3)
    x = torch.randn(len(lengths), total, n_embd, generator=g)  # row i: its width - n pads, then its tokens
    out = {}
    with torch.no_grad():
        B = len(lengths)
        cache = KVCache(config, B, total, "cpu", torch.float32, pad=[width - n for n in lengths])
        first = attn(x[:, :width], cache.mask(B, width), cache, 0)
        cache.length = width
        later = []
        for t in range(width, total):
            later.append(attn(x[:, t:t + 1], cache.mask(B, 1), cache, 0))
            cache.length = t + 1
        padded = torch.cat([first, *later], dim=1)
        for i, n in enumerate(lengths):
            out[f"row {i} ({n} tokens after {width - n} pads): real positions"] = padded[i, width - n:]
            alone = KVCache(config, 1, total, "cpu", torch.float32)
            out[f"row {i}: the same row alone"] = attn(x[i:i + 1, width - n:], alone.mask(1, n + steps), alone, 0)[0]
    return out


def attention_training(seed, batch, n_head, n_embd, T, dropout):
    """Attention dropout as training uses it: off in eval mode (the output is the dropout-free one, with and
    without a cache), on the attention weights in training mode. The random state is fixed right before the
    training call, so the dropout masks, and so the numbers, are the same for every correct solution."""
    from model import CausalSelfAttention, KVCache

    config = tiny_config(block_size=T + 1, n_head=n_head, n_embd=n_embd, dropout=dropout)
    g = generator(seed)
    attn = CausalSelfAttention(config)
    randomize(attn, g, 0.3)
    x = torch.randn(batch, T, n_embd, generator=g)
    out = {}
    attn.eval()
    with torch.no_grad():
        torch.manual_seed(seed)
        out["eval mode: output"] = attn(x)
        cache = KVCache(config, batch, T, "cpu", torch.float32)
        cut = T // 2
        first = attn(x[:, :cut], cache.mask(batch, cut), cache, 0)
        cache.length = cut
        out["eval mode, cached: output"] = torch.cat([first, attn(x[:, cut:], cache.mask(batch, T - cut), cache, 0)],
                                                     dim=1)
    attn.train()
    x.requires_grad_(True)
    torch.manual_seed(seed)
    y = attn(x)
    (y ** 2).mean().backward()
    out["train mode: output"] = y.detach()
    out["train mode: gradient wrt x"] = x.grad
    out["train mode: gradient wrt c_attn.weight"] = attn.c_attn.weight.grad
    return out


# ----------------------------------------------------------------------------------------------------------
# Part 2: scale, LoRAUpdate.__init__, LoRALinear.forward, LoRALinear.merge and unmerge


def lora_layer(seed, in_features, out_features, rank, alpha, slices, rslora=False, init="kaiming"):
    """A LoRALinear around a random frozen Linear: its start, its output and gradients once A and B are
    random, and merge / unmerge (each twice)."""
    import torch.nn as nn

    import lora

    g = generator(seed)
    base = nn.Linear(in_features, out_features)
    randomize(base, g, 0.5)
    base.requires_grad_(False)
    x = torch.randn(3, 5, in_features, generator=g)
    out = {"scale(alpha, rank, rslora)": float(lora.scale(alpha, rank, rslora))}
    torch.manual_seed(seed)
    config = lora.LoRAConfig(rank=rank, alpha=alpha, rslora=rslora, init=init)
    layer = lora.LoRALinear(base, {name: tuple(s) for name, s in slices.items()}, config)
    out["layer.scale"] = float(layer.scale)
    for name, update in sorted(layer.lora.items()):
        A, B = update.lora_A, update.lora_B
        out[f"{name}: shapes of A, B"] = (tuple(A.shape), tuple(B.shape))
        out[f"{name}: A and B are trainable parameters"] = isinstance(A, nn.Parameter) and A.requires_grad \
            and isinstance(B, nn.Parameter) and B.requires_grad
        out[f"{name}: B starts at zero"] = bool((B == 0).all())
        out[f"{name}: A starts random"] = bool((A != 0).float().mean() > 0.9) and A.std().item() > 0
        if init == "kaiming":  # nn.Linear's own init: uniform within +-1/sqrt(in_features)
            out[f"{name}: A within +-1/sqrt(in)"] = bool(A.abs().max() <= 1 / math.sqrt(in_features) + 1e-6)
        else:  # Gaussian with std 1/r
            out[f"{name}: A has std about 1/r"] = abs(A.std().item() * rank - 1) < 0.3
    with torch.no_grad():
        out["output at the start (B = 0)"] = layer(x)
        for _, update in sorted(layer.lora.items()):
            update.lora_A.copy_(torch.randn(update.lora_A.shape, generator=g) * 0.3)
            update.lora_B.copy_(torch.randn(update.lora_B.shape, generator=g) * 0.3)
    y = layer(x)
    out["output"] = y.detach().clone()
    (y ** 2).mean().backward()
    for name, update in sorted(layer.lora.items()):
        out[f"{name}: gradient of A"], out[f"{name}: gradient of B"] = update.lora_A.grad, update.lora_B.grad
    with torch.no_grad():
        for step, action in enumerate(["merge", "merge", "unmerge", "unmerge"]):
            getattr(layer, action)()
            what = f"after {action}() #{step}"
            out[f"{what}: weight"] = layer.weight.detach().clone()
            out[f"{what}: output"] = layer(x)
            out[f"{what}: merged"] = bool(layer.merged)
    out["base weight still frozen"] = not layer.weight.requires_grad
    return out


def lora_training(seed, in_features, out_features, rank, alpha, slices, dropout):
    """A LoRALinear with dropout as training uses it: dropout acts on the LoRA branch's input only, in training
    only, so at the start (B = 0) the layer is the frozen Linear exactly, in train mode too; the gradient
    reaches A, B and x, never W0 or b; a merged layer is W x + b in train mode too. The random state is fixed
    right before each training-mode call, so the dropout masks are the same for every correct solution."""
    import torch.nn as nn

    import lora

    g = generator(seed)
    base = nn.Linear(in_features, out_features)
    randomize(base, g, 0.5)
    base.requires_grad_(False)
    x = torch.randn(3, 5, in_features, generator=g)
    torch.manual_seed(seed)
    config = lora.LoRAConfig(rank=rank, alpha=alpha, dropout=dropout)
    layer = lora.LoRALinear(base, {name: tuple(s) for name, s in slices.items()}, config).train()
    out = {}
    with torch.no_grad():
        torch.manual_seed(seed + 1)
        start = layer(x)
        out["train mode, B = 0: output"] = start
        # to float rounding: x @ W.T + b and F.linear may round differently; dropout there moves it by ~0.1-1
        out["train mode, B = 0: equals the frozen Linear"] = torch.allclose(start, base(x), rtol=1e-6, atol=1e-6)
        for _, update in sorted(layer.lora.items()):
            update.lora_A.copy_(torch.randn(update.lora_A.shape, generator=g) * 0.3)
            update.lora_B.copy_(torch.randn(update.lora_B.shape, generator=g) * 0.3)
        layer.eval()
        torch.manual_seed(seed + 2)
        out["eval mode: output (no dropout)"] = layer(x)
    layer.train()
    x.requires_grad_(True)
    torch.manual_seed(seed + 3)
    y = layer(x)
    (y ** 2).mean().backward()
    out["train mode: output"] = y.detach()
    out["train mode: gradient wrt x"] = x.grad
    for name, update in sorted(layer.lora.items()):
        out[f"{name}: train mode: gradient of A"] = update.lora_A.grad
        out[f"{name}: train mode: gradient of B"] = update.lora_B.grad
    out["W0 and b get no gradient"] = layer.weight.grad is None and layer.bias.grad is None
    with torch.no_grad():
        w0 = layer.weight.clone()
        layer.merge()
        torch.manual_seed(seed + 4)
        merged = layer(x)
        out["merged, train mode: output"] = merged
        out["merged, train mode: is W x + b (no dropout)"] = torch.allclose(
            merged, F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
        layer.unmerge()
        out["merge then unmerge: W0 again"] = torch.allclose(layer.weight, w0, rtol=0, atol=1e-5)
    return out


# ----------------------------------------------------------------------------------------------------------
# Part 3: apply_lora

TABLE5 = [("q",), ("k",), ("v",), ("o",), ("q", "k"), ("q", "v"), ("q", "k", "v", "o")]
TABLE5_RANKS = [8, 8, 8, 8, 4, 4, 2]


def placement(seed, rank, alpha, settings, **shape):
    """Which modules apply_lora wraps, on which output slices, what is trainable, and what it records."""
    from lora import LoRAConfig, LoRALinear, apply_lora, config_of
    from model import GPT

    out = {}
    for targets in settings:
        torch.manual_seed(seed)
        model = GPT(tiny_config(**shape))
        key = ",".join(targets)
        config = LoRAConfig(rank=rank, alpha=alpha, targets=targets)
        out[f"{key}: returns the model"] = apply_lora(model, config) is model
        trainable = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
        out[f"{key}: trainable parameters"] = sorted(trainable.items())
        out[f"{key}: trainable count"] = sum(math.prod(s) for s in trainable.values())
        out[f"{key}: parameter count"] = sum(p.numel() for p in model.parameters())
        out[f"{key}: LoRALinear modules"] = [
            (name, sorted((k, tuple(int(i) for i in s)) for k, s in m.slices.items()), float(m.scale))
            for name, m in model.named_modules() if isinstance(m, LoRALinear)]
        out[f"{key}: every layer keeps the config"] = config_of(model) == config
    return out


def table5(n_layer=96, n_embd=12288, n_head=96):
    """Table 5's budget on GPT-3's shape (96 layers, d = 12288): every setting trains 18.9M parameters. One
    layer is built (on the meta device: no memory) and counted 96 times."""
    from lora import LoRAConfig, apply_lora
    from model import GPT

    out = {}
    for targets, rank in zip(TABLE5, TABLE5_RANKS, strict=True):
        with torch.device("meta"):
            model = GPT(tiny_config(n_layer=1, n_head=n_head, n_embd=n_embd, vocab_size=8, block_size=8))
        apply_lora(model, LoRAConfig(rank=rank, targets=targets))
        per_layer = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out[f"{','.join(targets)} r={rank}: trainable in {n_layer} layers"] = per_layer * n_layer
    return out


def placement_in_use(seed, rank, alpha, dropout, targets, dtype, **shape):
    """apply_lora on a model in another dtype, as train.py and the scripts use it: A and B in the base weights'
    dtype, every layer with the same config, the base weights untouched, and a second apply_lora refused."""
    from lora import LoRAConfig, LoRALinear, apply_lora
    from model import GPT

    torch.manual_seed(seed)
    model = GPT(tiny_config(**shape)).to(getattr(torch, dtype))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(targets))
    apply_lora(model, config)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    out = {"dtypes of A and B": sorted({str(p.dtype) for name, p in model.named_parameters() if ".lora." in name}),
           "every LoRALinear keeps the config": bool(layers) and all(m.config == config for m in layers),
           "LoRA dropout of every layer": [float(m.dropout.p) for m in layers],
           "base weights unchanged": all(torch.equal(p, before[name]) for name, p in model.named_parameters()
                                         if name in before)}
    try:
        apply_lora(model, config)
        out["a second apply_lora raises ValueError"] = False
    except ValueError:
        out["a second apply_lora raises ValueError"] = True
    out["LoRALinear count after the refusal"] = sum(isinstance(m, LoRALinear) for m in model.modules())
    return out


# ----------------------------------------------------------------------------------------------------------
# Part 4: make_batch and GPT.forward


def random_split(seed, n_examples, vocab_size=50257):
    """A Split of random examples: lengths 2..13 tokens, each with a prompt of 1..length-1 tokens."""
    from data.e2e.batches import Split

    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 14, n_examples)
    prompt_lens = np.array([rng.integers(1, n) for n in lengths], dtype=np.int32)
    tokens = rng.integers(0, vocab_size, int(lengths.sum())).astype(np.uint16)
    return Split(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), prompt_lens)


def batching(seed, n_examples, pad_to):
    """make_batch on a few index lists: x, y exactly (y is -1 on the prompt and on padding)."""
    from data.e2e.batches import make_batch

    split = random_split(seed, n_examples)
    rng = np.random.default_rng(seed + 1)
    out = {}
    for i, indices in enumerate([np.arange(4), rng.permutation(n_examples)[:5], np.array([n_examples - 1])]):
        x, y = make_batch(split, indices, pad_to=pad_to)
        out[f"batch {i}: x"], out[f"batch {i}: y"] = x, y
        out[f"batch {i}: dtypes"] = (str(x.dtype), str(y.dtype))
    return out


def forward_and_step(seed, batch, label_smoothing, n_examples=6, **shape):
    """GPT.forward without targets, with targets (the loss on the completion only), through a KV cache,
    and one AdamW step on a batch from make_batch."""
    from data.e2e.batches import make_batch
    from model import GPT

    config = tiny_config(**shape)
    g = generator(seed)
    model = GPT(config)
    randomize(model, g, 0.05)
    idx = torch.randint(0, config.vocab_size, (batch, 9), generator=g)
    targets = torch.randint(0, config.vocab_size, (batch, 9), generator=g)
    targets[:, :3] = -1  # a prompt
    targets[0, 7:] = -1  # padding
    out = {}
    with torch.no_grad():
        logits, loss = model(idx)
        out["logits (no targets)"], out["loss is None (no targets)"] = logits, loss is None
        logits, loss = model(idx, targets, label_smoothing=label_smoothing)
        out["logits (targets)"], out["loss (targets)"] = logits, loss
        cache = model.new_cache(batch, 9)
        for i, (start, end) in enumerate([(0, 4), (4, 5), (5, 8)]):
            out[f"cached step {i}: logits"] = model(idx[:, start:end], cache=cache)[0]
        out["cache.length"] = cache.length
    try:
        model(torch.zeros(1, config.block_size + 1, dtype=torch.long))
        out["too long a sequence raises ValueError"] = False
    except ValueError:
        out["too long a sequence raises ValueError"] = True
    # one training step on a batch of E2E-like examples
    x, y = make_batch(random_split(seed, n_examples), np.arange(n_examples))
    x, y = x % config.vocab_size, torch.where(y < 0, y, y % config.vocab_size)  # GPT-2's tokens into the tiny vocab
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    _, loss = model(x, y, label_smoothing=label_smoothing)
    loss.backward()
    opt.step()
    out["training loss"] = loss.detach()
    for name in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.bias"):
        out[f"after one step: {name}"] = model.get_parameter(name).detach().clone()
    return out


def forward_padded(seed, lengths, steps, **shape):
    """GPT.forward on prompts of different lengths left-padded on one cache (pad tokens are random): each row's
    positions count from its first real token, so its real logits are those of the row alone."""
    from model import GPT

    config = tiny_config(**shape)
    g = generator(seed)
    model = GPT(config).eval()
    randomize(model, g, 0.3)
    width = max(lengths)
    idx = torch.randint(0, config.vocab_size, (len(lengths), width + steps), generator=g)
    out = {}
    with torch.no_grad():
        cache = model.new_cache(len(lengths), width + steps, pad=[width - n for n in lengths])
        logits = [model(idx[:, :width], cache=cache)[0]]
        logits += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(width, width + steps)]
        logits = torch.cat(logits, dim=1)
        for i, n in enumerate(lengths):
            out[f"row {i} ({n} tokens after {width - n} pads): real logits"] = logits[i, width - n:]
        out["cache.length"] = cache.length
    return out


def forward_in_training(seed, batch, dropout, label_smoothing, **shape):
    """GPT.forward as training uses it: with dropout and label smoothing in train mode (the random state fixed
    right before the call, so the masks are the same for every correct solution), dropout off in eval mode,
    and a cache that would run past block_size refused before anything is written."""
    from model import GPT

    config = tiny_config(dropout=dropout, **shape)
    g = generator(seed)
    model = GPT(config)
    randomize(model, g, 0.5)  # logits far from uniform, so that label smoothing moves the loss well past 1e-4
    idx = torch.randint(0, config.vocab_size, (batch, 9), generator=g)
    targets = torch.randint(0, config.vocab_size, (batch, 9), generator=g)
    targets[:, :3] = -1  # a prompt
    targets[0, 7:] = -1  # padding
    out = {}
    model.eval()
    with torch.no_grad():
        torch.manual_seed(seed)
        out["eval mode: loss (no dropout)"] = model(idx, targets, label_smoothing=label_smoothing)[1]
    model.train()
    torch.manual_seed(seed)
    logits, loss = model(idx, targets, label_smoothing=label_smoothing)
    loss.backward()
    out["train mode: logits"], out["train mode: loss"] = logits.detach(), loss.detach()
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"):
        out[f"train mode: gradient of {name}"] = model.get_parameter(name).grad
    model.eval()
    with torch.no_grad():
        cache = model.new_cache(1, config.block_size)
        model(idx[:1, :1].repeat(1, config.block_size - 1), cache=cache)
        try:
            model(idx[:1, :2], cache=cache)
            out["past + T > block_size raises ValueError"] = False
        except ValueError:
            out["past + T > block_size raises ValueError"] = True
        out["cache.length after the refusal"] = cache.length
        out["the last position still fits: logits"] = model(idx[:1, :1], cache=cache)[0]
    return out


# ----------------------------------------------------------------------------------------------------------
# Part 5: subspace_similarity and projection_norms


def similarity(seed, d, r1, r2):
    """phi(A1, A2, i, j) for every i <= r1, j <= r2, with A2 sharing part of A1's row space."""
    from lora_analysis import subspace_similarity

    g = generator(seed)
    A1 = torch.randn(r1, d, generator=g)
    A2 = torch.randn(r2, r1, generator=g) @ A1 + 0.7 * torch.randn(r2, d, generator=g)
    phi = [[subspace_similarity(A1, A2, i, j) for j in range(1, r2 + 1)] for i in range(1, r1 + 1)]
    return {"phi(A1, A2, i, j)": torch.tensor(phi, dtype=torch.float64),
            "phi is a Python float": all(isinstance(p, float) for row in phi for p in row),
            "phi(A1, A1, r1, r1)": subspace_similarity(A1, A1, r1, r1),
            "phi(A1, A2 of another width) i=1,j=r2": subspace_similarity(A1, A2, 1, r2)}


def amplification(seed, out_features, in_features, r):
    """projection_norms of a random rank-r Delta W against a random W."""
    from lora_analysis import projection_norms

    g = generator(seed)
    W = torch.randn(out_features, in_features, generator=g)
    delta = 0.05 * torch.randn(out_features, r, generator=g) @ torch.randn(r, in_features, generator=g)
    norms = projection_norms(delta, W, r, seed=seed)
    out = {f"norms[{key!r}]": float(norms[key]) for key in ("delta", "w", "w_norm", "delta_norm", "amplification")}
    # the random reference depends on how it is drawn: only its bound is checked
    out["norms['random'] <= norms['w']"] = norms["random"] <= norms["w"] + 1e-9
    out["keys"] = sorted(norms)
    return out


def analysis_contract(seed, d, r1, r2):
    """What the analysis functions promise besides their values: subspace_similarity refuses i or j outside
    1..r (ValueError) rather than slicing fewer directions than asked; projection_norms draws its random
    reference from `seed` (the same seed: the same number; another seed: another number)."""
    from lora_analysis import projection_norms, subspace_similarity

    g = generator(seed)
    A1, A2 = torch.randn(r1, d, generator=g), torch.randn(r2, d, generator=g)
    out = {}
    for i, j in ((0, 1), (1, 0), (r1 + 1, 1), (1, r2 + 1)):
        try:
            subspace_similarity(A1, A2, i, j)
            out[f"phi(i={i}, j={j}) raises ValueError"] = False
        except ValueError:
            out[f"phi(i={i}, j={j}) raises ValueError"] = True
    out["phi(i=r1, j=r2)"] = subspace_similarity(A1, A2, r1, r2)
    W = torch.randn(d, d + 2, generator=g)
    delta = torch.randn(d, 2, generator=g) @ torch.randn(2, d + 2, generator=g)
    first, again, other = (projection_norms(delta, W, 2, seed=s)["random"] for s in (seed, seed, seed + 1))
    out["norms['random']: the same seed gives the same number"] = first == again
    out["norms['random']: another seed gives another number"] = abs(first - other) > 1e-9
    return out


CHECKS = {f.__name__: f for f in (loading, loading_for_training, attention, cache_store, cache_mask,
                                  attention_training, attention_padded, forward_padded, lora_layer, lora_training,
                                  placement, table5, placement_in_use, batching, forward_and_step,
                                  forward_in_training, similarity, amplification, analysis_contract)}

# ----------------------------------------------------------------------------------------------------------
# Running a case and comparing its numbers.


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise CaseTimeout in this (main) thread after `seconds` (a loop that never returns to Python is left
    to the grader, which kills the process)."""
    def expire(signum, frame):
        raise CaseTimeout(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_case(case, seconds=CASE_SECONDS):
    """The named numbers of one case, (part, check, kwargs)."""
    _, check, kwargs = case
    with time_limit(seconds):
        return CHECKS[check](**kwargs)


def describe(value):
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}" if value.numel() > 6 else f"tensor {value.tolist()}"
    text = repr(value)
    return text if len(text) < 200 else text[:200] + "..."


def compare(expected, got, rtol=1e-4, atol=1e-5):
    """The differences between two results, one line each (empty when they agree)."""
    if not isinstance(got, dict):
        return [f"the check returned {type(got).__name__}, not named numbers"]
    problems = [f"{name}: missing" for name in expected if name not in got]
    for name, want in expected.items():
        if name not in got:
            continue
        have = got[name]
        if isinstance(want, torch.Tensor):
            if not isinstance(have, torch.Tensor):
                problems.append(f"{name}: expected a tensor, got {describe(have)}")
            elif tuple(have.shape) != tuple(want.shape):
                problems.append(f"{name}: expected shape {tuple(want.shape)}, got {tuple(have.shape)}")
            elif want.is_floating_point():
                have, want = have.detach().double(), want.double()
                if not torch.allclose(have, want, rtol=rtol, atol=atol, equal_nan=True):
                    worst = (have - want).abs().nan_to_num(float("inf")).max().item()
                    problems.append(f"{name}: values differ (largest difference {worst:.3g})")
            elif not torch.equal(have.long(), want.long()):
                wrong = (have.long() != want.long()).sum().item()
                problems.append(f"{name}: {wrong} of {want.numel()} entries differ")
        elif isinstance(want, float) and isinstance(have, (int, float)) and not isinstance(have, bool):
            if not math.isclose(have, want, rel_tol=rtol, abs_tol=atol):
                problems.append(f"{name}: expected {want:.6g}, got {have:.6g}")
        elif have != want:
            problems.append(f"{name}: expected {describe(want)}, got {describe(have)}")
    return problems


def outcome(expected, case, seconds=CASE_SECONDS):
    """(passed, message) of one case against its expected numbers; never raises (but for KeyboardInterrupt)."""
    try:
        got = run_case(case, seconds)
    except (Exception, SystemExit) as e:  # the student's code may raise anything
        return False, f"raised {type(e).__name__}: {e}"
    problems = compare(expected, got)
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        return False, "\n".join(shown)
    return True, f"{len(expected)} numbers agree"


def check_public(name):
    """The problems of one public case against assignments/expected.pt (the starter's tests call this)."""
    expected = torch.load(EXPECTED, weights_only=True)[name]
    passed, message = outcome(expected, PUBLIC[name])
    return [] if passed else [message]
