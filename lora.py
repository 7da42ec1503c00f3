"""LoRA (Hu et al., 2021): freeze W0 and learn a low-rank update, h = W0 x + (alpha / r) B A x.

Read it top to bottom: LoRAUpdate (one A, B pair) -> LoRALinear (a frozen Linear plus updates on slices of
its outputs, with merge / unmerge) -> apply_lora (where the updates go in GPT-2) -> the adapter file.

GPT-2 fuses Wq, Wk and Wv into one Linear, attn.c_attn, whose outputs are [q | k | v]. Each chosen
projection gets its own A and B and adds to its own third of c_attn's output: choosing q and v leaves
the k third exactly as it was (the paper's section 7.1 asks which of Wq, Wk, Wv, Wo to adapt).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tools.files import load_safetensors, read_safetensors_header, save_safetensors

TARGETS = ("q", "k", "v", "o", "mlp")  # Wq, Wk, Wv, Wo, and the two MLP matrices (c_fc, c_proj)


def scale(alpha, rank, rslora=False):
    """The update's multiplier: alpha / r keeps its size steady as r changes; rsLoRA's alpha / sqrt(r)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def qkv_slices(n_embd):
    """Which outputs of the fused c_attn each of Wq, Wk, Wv produces."""
    return {"q": (0, n_embd), "k": (n_embd, 2 * n_embd), "v": (2 * n_embd, 3 * n_embd)}


class LoRAUpdate(nn.Module):
    """One rank-r update B A of a projection: A (r x in) starts random and B (out x r) at zero, so B A = 0 and
    the adapted model starts out exactly equal to the base model; training moves B away from zero."""

    def __init__(self, in_features, out_features, rank, init="kaiming"):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as loralib (nn.Linear's own init)
        else:
            nn.init.normal_(self.lora_A, std=1.0 / rank)  # "random Gaussian initialization for A" (section 4.1)

    def delta_weight(self):
        """B A in fp32, whatever the parameters' dtype: the merge accumulates in fp32."""
        return self.lora_B.float() @ self.lora_A.float()


class LoRALinear(nn.Module):
    """A frozen Linear h = W0 x + b with rank-r updates on slices of its outputs:
    h[s:e] += (alpha / r) * B A dropout(x) for each adapted slice [s, e) (all of h for a plain projection).

    It keeps the Linear's own weight and bias (same names, same tensors), so the base weights are still at e.g.
    transformer.h.0.attn.c_attn.weight. After merge() the updates live in W itself: one matmul, as fast as the base.
    """

    def __init__(self, base, slices, rank, alpha, dropout=0.0, rslora=False, init="kaiming"):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # W0 and b, frozen by apply_lora
        self.slices = slices  # {"q": (0, 768), "v": (1536, 2304)}: which outputs each update adds to
        self.scale = scale(alpha, rank, rslora)
        self.lora = nn.ModuleDict({name: LoRAUpdate(base.in_features, end - start, rank, init)
                                   for name, (start, end) in slices.items()})
        self.dropout = nn.Dropout(dropout)  # acts on the LoRA branch's input only
        self.merged = False

    def forward(self, x):
        h = F.linear(x, self.weight, self.bias)
        if self.merged:
            return h
        x = self.dropout(x)
        for name, update in self.lora.items():
            start, end = self.slices[name]
            # (alpha / r) B (A x): two thin matmuls, never the full out x in matrix B A
            delta = self.scale * F.linear(F.linear(x, update.lora_A), update.lora_B)
            # h with outputs [start, end) moved by delta, out of place: h may be a view of the frozen path's
            # result, which autograd does not let us change in place
            h = h.slice_scatter(h[..., start:end] + delta, dim=-1, start=start, end=end)
        return h

    @torch.no_grad()
    def merge(self, sign=1):
        """W[s:e] += (alpha / r) B A (sign=-1 takes it out again), in fp32, rounded once into W's dtype."""
        if self.merged == (sign == 1):
            return  # merging twice, or unmerging what is not merged, would change W0
        for name, update in self.lora.items():
            start, end = self.slices[name]
            w = self.weight[start:end]
            w.copy_(w.float() + sign * self.scale * update.delta_weight())
        self.merged = sign == 1


def lora_layers(model):
    """Every LoRALinear in the model, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def apply_lora(model, rank=4, alpha=32, dropout=0.0, targets=("q", "v"), rslora=False, init="kaiming"):
    """Put rank-r updates on the chosen projections of every layer, in place; freeze everything else.
    Defaults are the paper's GPT-2 E2E setting: Wq and Wv, r = 4, alpha = 32 (a scale of 8)."""
    if not targets or set(targets) - set(TARGETS) or rank < 1 or init not in ("kaiming", "gaussian"):
        raise SystemExit(f"error: unknown LoRA targets or settings: targets {list(targets)} (some of "
                         f"{', '.join(TARGETS)}), rank {rank} (1 or more), init {init!r} (kaiming or gaussian)")
    if lora_layers(model):
        c = model.lora_config
        raise SystemExit(f"error: this model already has LoRA layers (rank {c['rank']}, targets {c['targets']})")
    targets = [t for t in TARGETS if t in targets]  # canonical order, no repeats
    for p in model.parameters():
        p.requires_grad_(False)  # W0 stays frozen: only A and B are trained
    C = model.config.n_embd
    options = dict(rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, init=init)
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        chosen = {t: s for t, s in qkv_slices(C).items() if t in targets}
        if chosen:
            attn.c_attn = LoRALinear(attn.c_attn, chosen, **options)
        if "o" in targets:
            attn.c_proj = LoRALinear(attn.c_proj, {"o": (0, C)}, **options)
        if "mlp" in targets:
            mlp.c_fc = LoRALinear(mlp.c_fc, {"mlp": (0, 4 * C)}, **options)
            mlp.c_proj = LoRALinear(mlp.c_proj, {"mlp": (0, C)}, **options)
    p = model.transformer.wte.weight
    model.to(device=p.device, dtype=p.dtype)  # A and B where and as the base weights are
    model.lora_config = dict(rank=rank, alpha=alpha, targets=targets, rslora=rslora, init=init, dropout=dropout)
    return model


def merge_lora(model):
    """Fold every update into its weight (W = W0 + (alpha / r) B A); a second call does nothing."""
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model):
    """Take every update out of its weight again (W = W - (alpha / r) B A)."""
    for layer in lora_layers(model):
        layer.merge(sign=-1)
    return model


# The adapter file: the LoRA tensors only, as safetensors, with the settings in its metadata (plain strings).
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")


def lora_state_dict(model):
    """{name: tensor} of every lora_A and lora_B, e.g. transformer.h.0.attn.c_attn.lora.q.lora_A."""
    return {name: p.detach() for name, p in model.named_parameters() if ".lora." in name}


def save_adapter(model, path, data_format="paper"):
    """Write the adapter (LoRA tensors + settings + the base model's name and shape + the E2E data format it
    was trained on) atomically. Every tensor must be finite: a NaN adapter is never written."""
    tensors = lora_state_dict(model)
    if not all(t.isfinite().all() for t in tensors.values()):
        raise SystemExit(f"error: not writing {path}: the LoRA tensors are not all finite")
    c = model.lora_config
    metadata = {"format": "lora-gpt-adapter", "rank": str(c["rank"]), "alpha": str(c["alpha"]),
                "targets": ",".join(c["targets"]), "scaling": "alpha/sqrt(r)" if c["rslora"] else "alpha/r",
                "init": c["init"], "dropout": str(c["dropout"]), "base_model": str(model.name_or_path),
                "data_format": data_format, **{key: str(getattr(model.config, key)) for key in SHAPE_KEYS}}
    save_safetensors(tensors, path, metadata)


def lora_config(path):
    """The adapter file's settings as Python values: rank, alpha, targets, rslora, base_model, shape, ..."""
    _, meta = read_safetensors_header(path)
    if meta.get("format") != "lora-gpt-adapter":
        raise SystemExit(f"error: {path} is not a lora-gpt adapter file (no adapter metadata in its header)")
    try:
        return dict(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=meta["targets"].split(","),
                    rslora=meta["scaling"] == "alpha/sqrt(r)", init=meta["init"], dropout=float(meta["dropout"]),
                    base_model=meta["base_model"], data_format=meta.get("data_format", "plain"),
                    shape={key: int(meta[key]) for key in SHAPE_KEYS})
    except (KeyError, ValueError) as e:
        raise SystemExit(f"error: {path}: adapter metadata is incomplete or damaged ({e!r})") from None


def load_adapter(model, path):
    """Put an adapter file's LoRA (apply_lora with its settings, then its tensors) on a base model of its shape."""
    config = lora_config(path)
    differ = [f"{k} {config['shape'][k]} vs {getattr(model.config, k)}" for k in SHAPE_KEYS
              if config["shape"][k] != getattr(model.config, k)]
    if differ:
        raise SystemExit(f"error: {path} was made for {config['base_model']} and does not fit this model "
                         f"({model.name_or_path}): {', '.join(differ)}")
    apply_lora(model, rank=config["rank"], alpha=config["alpha"], targets=config["targets"],
               rslora=config["rslora"], init=config["init"])
    tensors, _ = load_safetensors(path)
    expected = lora_state_dict(model)
    if {n: tuple(t.shape) for n, t in tensors.items()} != {n: tuple(t.shape) for n, t in expected.items()}:
        raise SystemExit(f"error: {path} does not hold this model's LoRA tensors "
                         f"(missing {sorted(set(expected) - set(tensors))[:2]}, "
                         f"unexpected {sorted(set(tensors) - set(expected))[:2]}, or other shapes)")
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    model.data_format = config["data_format"]
    return model
