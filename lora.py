"""LoRA (Hu et al., 2021): freeze W0 and learn a low-rank update, h = W0 x + (alpha / r) B A x.

Read it top to bottom: LoRAUpdate (one A, B pair) -> LoRALinear (a frozen Linear plus updates on slices of
its outputs, with merge / unmerge) -> apply_lora (where the updates go in GPT-2) -> merge_lora /
unmerge_lora / trainable_report -> save_adapter / load_adapter (the adapter file).

GPT-2 fuses Wq, Wk and Wv into one Linear, attn.c_attn, whose outputs are [q | k | v]. Each chosen
projection gets its own A and B and adds to its own third of c_attn's output: choosing q and v leaves
the k third exactly as it was (the paper's section 7.1 question is which of Wq, Wk, Wv, Wo to adapt).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import UserError, load_safetensors, read_safetensors_header, save_safetensors
from model import GPT, linear

TARGETS = ("q", "k", "v", "o", "mlp")  # Wq, Wk, Wv, Wo, and the two MLP matrices (c_fc, c_proj)


class LoRAUpdate(nn.Module):
    """One rank-r update B A of a projection with in_features inputs and out_features outputs.

    A (r x in) starts random and B (out x r) at zero, so B A = 0 and the adapted model starts out
    exactly equal to the base model; training moves B away from zero.
    """

    def __init__(self, in_features, out_features, rank, init="kaiming"):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as loralib (nn.Linear's own init)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / rank)  # "random Gaussian initialization for A" (section 4.1)
        else:
            raise UserError(f"unknown LoRA init {init!r}: use kaiming or gaussian")

    def delta_weight(self):
        """B A in fp32, whatever the parameters' dtype: the merge accumulates in fp32."""
        return self.lora_B.float() @ self.lora_A.float()


class LoRALinear(nn.Module):
    """A frozen Linear h = W0 x + b with rank-r updates on slices of its outputs:
    h[s:e] += (alpha / r) * B A dropout(x) for each adapted slice [s, e) (all of h for a plain projection).

    It keeps the Linear's own weight and bias parameters (same names, same tensors), so the base
    weights are still found at e.g. transformer.h.0.attn.c_attn.weight. After merge() the updates live in
    the weight itself and forward is one matmul, as fast as the base model.
    """

    def __init__(self, base, slices, rank, alpha, dropout=0.0, rslora=False, init="kaiming"):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # W0 and b, frozen by apply_lora
        self.slices = slices  # {"q": (0, 768), "v": (1536, 2304)}: which outputs each update adds to
        # alpha / r keeps the update's size steady as r changes; rsLoRA's alpha / sqrt(r) grows with r
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.lora = nn.ModuleDict({name: LoRAUpdate(base.in_features, end - start, rank, init)
                                   for name, (start, end) in slices.items()})
        self.dropout = nn.Dropout(dropout)  # acts on the LoRA branch's input only
        self.merged = False

    def forward(self, x):
        h = linear(x, self.weight, self.bias)  # model.linear: F.linear, quicker for one token on a CPU
        if self.merged:
            return h
        x = self.dropout(x)
        for name, update in self.lora.items():
            start, end = self.slices[name]
            # (alpha / r) B (A x): two thin matmuls, never the full out x in matrix B A
            delta = self.scale * F.linear(F.linear(x, update.lora_A), update.lora_B)
            # h with outputs [start, end) moved by delta (out of place: h may be a view of the frozen path's
            # result, which autograd does not let us change in place)
            h = h.slice_scatter(h[..., start:end] + delta, dim=-1, start=start, end=end)
        return h

    @torch.no_grad()
    def merge(self):
        """W[s:e] += (alpha / r) B A, computed in fp32 and rounded once into W's dtype."""
        if self.merged:
            return
        for name, update in self.lora.items():
            start, end = self.slices[name]
            w = self.weight[start:end]
            w.copy_(w.float() + self.scale * update.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W[s:e] -= (alpha / r) B A: W0 again (exactly up to fp32 rounding; lossy in bf16/fp16)."""
        if not self.merged:
            return
        for name, update in self.lora.items():
            start, end = self.slices[name]
            w = self.weight[start:end]
            w.copy_(w.float() - self.scale * update.delta_weight())
        self.merged = False


def lora_layers(model):
    """Every LoRALinear in the model, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def apply_lora(model, rank=4, alpha=32, dropout=0.0, targets=("q", "v"), rslora=False, init="kaiming"):
    """Put rank-r updates on the chosen projections of every layer, in place; freeze everything else.

    Defaults are the paper's GPT-2 E2E setting: Wq and Wv, r = 4, alpha = 32 (a scale of 8).
    """
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        raise UserError(f"unknown LoRA targets {sorted(unknown)}: choose some of {', '.join(TARGETS)}")
    targets = tuple(t for t in TARGETS if t in set(targets))  # canonical order, no repeats
    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1, got {rank}")
    if lora_layers(model):
        raise UserError("this model already has LoRA layers")
    for p in model.parameters():
        p.requires_grad_(False)  # W0 stays frozen: only A and B are trained
    C = model.config.n_embd
    qkv_slices = {"q": (0, C), "k": (C, 2 * C), "v": (2 * C, 3 * C)}
    options = dict(rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, init=init)
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        chosen = {t: qkv_slices[t] for t in targets if t in qkv_slices}
        if chosen:
            attn.c_attn = LoRALinear(attn.c_attn, chosen, **options)
        if "o" in targets:
            attn.c_proj = LoRALinear(attn.c_proj, {"o": (0, C)}, **options)
        if "mlp" in targets:
            mlp.c_fc = LoRALinear(mlp.c_fc, {"mlp": (0, 4 * C)}, **options)
            mlp.c_proj = LoRALinear(mlp.c_proj, {"mlp": (0, C)}, **options)
    p = model.transformer.wte.weight
    model.to(device=p.device, dtype=p.dtype)  # A and B where and as the base weights are
    model.lora_config = dict(rank=rank, alpha=alpha, targets=list(targets), rslora=rslora, init=init,
                             dropout=dropout)
    return model


def merge_lora(model):
    """Fold every update into its weight (W = W0 + (alpha / r) B A); a second call does nothing."""
    for layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model):
    """Take every update out of its weight again (W = W - (alpha / r) B A)."""
    for layer in lora_layers(model):
        layer.unmerge()
    return model


def trainable_report(model):
    """'trainable 147,456 of 124,587,264 (0.118%)': the parameters the optimizer will see."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"


# ----------------------------------------------------------------------------------------------------------
# The adapter file: the LoRA tensors only, as safetensors, with the settings that made them in its
# metadata (plain strings in the JSON header, so any tool can read them without torch).

SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")


def lora_state_dict(model):
    """{name: tensor} of every lora_A and lora_B, e.g. transformer.h.0.attn.c_attn.lora.q.lora_A."""
    return {name: p.detach() for name, p in model.named_parameters() if ".lora." in name}


def save_adapter(model, path):
    """Write the adapter (LoRA tensors + settings + the base model's name and shape) atomically."""
    config = model.lora_config
    metadata = {
        "format": "lora-gpt-adapter",
        "rank": str(config["rank"]), "alpha": str(config["alpha"]), "targets": ",".join(config["targets"]),
        "scaling": "alpha/sqrt(r)" if config["rslora"] else "alpha/r", "init": config["init"],
        "dropout": str(config["dropout"]), "base_model": str(model.name_or_path),
        **{key: str(getattr(model.config, key)) for key in SHAPE_KEYS},
    }
    save_safetensors(lora_state_dict(model), path, metadata)


def lora_config(path):
    """The adapter file's settings as Python values: rank, alpha, targets, rslora, base_model, shape."""
    _, meta = read_safetensors_header(path)
    if meta.get("format") != "lora-gpt-adapter":
        raise UserError(f"{path} is not a lora-gpt adapter file (no adapter metadata in its header)")
    try:
        return dict(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=meta["targets"].split(","),
                    rslora=meta["scaling"] == "alpha/sqrt(r)", init=meta["init"], dropout=float(meta["dropout"]),
                    base_model=meta["base_model"], shape={key: int(meta[key]) for key in SHAPE_KEYS})
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: adapter metadata is incomplete or damaged ({e!r})") from None


def load_adapter(model, path):
    """Load an adapter file into model, applying LoRA first if the model has none. Refuses, with what
    differs, an adapter made for another model shape or with other targets or rank."""
    config = lora_config(path)
    ours = {key: getattr(model.config, key) for key in SHAPE_KEYS}
    if config["shape"] != ours:
        theirs = config["shape"]
        differ = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in SHAPE_KEYS if theirs[k] != ours[k])
        raise UserError(f"{path} was made for {config['base_model']} and does not fit this model "
                        f"({model.name_or_path}): {differ}")
    if not lora_layers(model):
        apply_lora(model, rank=config["rank"], alpha=config["alpha"], targets=config["targets"],
                   rslora=config["rslora"], init=config["init"])
    have = model.lora_config
    for key in ("rank", "targets", "rslora"):
        if have[key] != config[key]:
            raise UserError(f"{path} has {key} {config[key]}, but this model's LoRA has {key} {have[key]}")
    if float(have["alpha"]) != config["alpha"]:
        raise UserError(f"{path} has alpha {config['alpha']}, but this model's LoRA has alpha {have['alpha']}")
    if any(layer.merged for layer in lora_layers(model)):
        raise UserError("cannot load an adapter into a merged model: unmerge it first")
    tensors, _ = load_safetensors(path)
    expected = lora_state_dict(model)
    if set(tensors) != set(expected):
        raise UserError(f"{path} does not hold this model's LoRA tensors "
                        f"(missing {sorted(set(expected) - set(tensors))[:2]}, "
                        f"unexpected {sorted(set(tensors) - set(expected))[:2]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                f"expected {tuple(expected[name].shape)}")
            expected[name].copy_(tensor)
    return model


def describe(config):
    """One line for logs: 'r=4 alpha=32 on q,v (scale 8)'."""
    scale = config["alpha"] / (math.sqrt(config["rank"]) if config["rslora"] else config["rank"])
    return f"r={config['rank']} alpha={config['alpha']:g} on {','.join(config['targets'])} (scale {scale:g})"



def load_model(model=None, adapter=None, merged=None):
    """The model a script runs: a merged checkpoint folder, or a base model plus an adapter (the base named in
    the adapter's metadata unless `model` says otherwise), or a base model alone (gpt2 by default)."""
    if merged is not None and adapter is not None:
        raise UserError("give --adapter or --merged, not both (a merged checkpoint already holds its adapter)")
    if merged is not None:
        return GPT.from_pretrained(merged)
    if adapter is not None:
        base = model if model is not None else lora_config(adapter)["base_model"]
        if base in ("", "None"):
            raise UserError(f"{adapter} does not name its base model; say which with --model")
        return load_adapter(GPT.from_pretrained(base), adapter)
    return GPT.from_pretrained(model if model is not None else "gpt2")
