"""LoRA (Hu et al., 2021): freeze W0 and learn a low-rank update, h = W0 x + (alpha / r) B A x.

Read it top to bottom: LoRAConfig (the settings) -> LoRAUpdate (one A, B pair) -> LoRALinear (a frozen Linear
plus updates on slices of its outputs, with merge / unmerge) -> apply_lora (where the updates go in GPT-2).
The adapter file that holds the trained A and B is written and read in checkpoints/adapters.py.

GPT-2 fuses Wq, Wk and Wv into one Linear, attn.c_attn, whose outputs are [q | k | v]. Each chosen
projection gets its own A and B and adds to its own third of c_attn's output: choosing q and v leaves
the k third exactly as it was (the paper's section 7.1 asks which of Wq, Wk, Wv, Wo to adapt).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from plumbing.errors import UserError

TARGETS = ("q", "k", "v", "o", "mlp")  # Wq, Wk, Wv, Wo, and the two MLP matrices (c_fc, c_proj)


def scale(alpha, rank, rslora=False):
    """The update's multiplier: alpha / r keeps its size steady as r changes; rsLoRA's alpha / sqrt(r)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def qkv_slices(n_embd):
    """Which outputs of the fused c_attn each of Wq, Wk, Wv produces."""
    return {"q": (0, n_embd), "k": (n_embd, 2 * n_embd), "v": (2 * n_embd, 3 * n_embd)}


@dataclass(frozen=True)
class LoRAConfig:
    """The settings of one adaptation, by default the paper's GPT-2 E2E setting: r = 4 on Wq and Wv, alpha = 32
    (a scale of 8). apply_lora takes it, every LoRALinear keeps it, and the adapter file stores it."""

    rank: int = 4
    alpha: float = 32
    targets: tuple = ("q", "v")  # some of TARGETS; kept in TARGETS' order, without repeats
    dropout: float = 0.0  # on the LoRA branch's input, in training
    rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    init: str = "kaiming"  # how A starts: "kaiming" (loralib) or "gaussian" (the paper's section 4.1)

    def __post_init__(self):
        if (not self.targets or set(self.targets) - set(TARGETS) or self.rank < 1
                or self.init not in ("kaiming", "gaussian")):
            raise UserError(f"unknown LoRA targets or settings: targets {list(self.targets)} (some of "
                            f"{', '.join(TARGETS)}), rank {self.rank} (1 or more), init {self.init!r} (kaiming or "
                            "gaussian)")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))  # canonical order

    @property
    def scale(self):
        return scale(self.alpha, self.rank, self.rslora)


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

    def __init__(self, base, slices, config):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # W0 and b, frozen by apply_lora
        self.slices = slices  # {"q": (0, 768), "v": (1536, 2304)}: which outputs each update adds to
        self.config = config  # the LoRAConfig these updates were made with
        self.scale = config.scale
        self.lora = nn.ModuleDict({name: LoRAUpdate(base.in_features, end - start, config.rank, config.init)
                                   for name, (start, end) in slices.items()})
        self.dropout = nn.Dropout(config.dropout)  # acts on the LoRA branch's input only
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
    def merge(self):
        """W[s:e] = W0[s:e] + (alpha / r) B A, in fp32, rounded once into W's dtype. Merging twice would add the
        update twice, so a merged layer is left as it is."""
        if not self.merged:
            self._add_updates(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W[s:e] = W[s:e] - (alpha / r) B A: W0 again (up to one rounding). An unmerged layer is left as it is."""
        if self.merged:
            self._add_updates(-1.0)
            self.merged = False

    def _add_updates(self, sign):
        for name, update in self.lora.items():
            start, end = self.slices[name]
            w = self.weight[start:end]
            w.copy_(w.float() + sign * self.scale * update.delta_weight())


def lora_layers(model):
    """Every LoRALinear in the model, in module order."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def config_of(model):
    """The LoRAConfig of a model's LoRA layers (None if it has none): apply_lora gives them all the same."""
    layers = lora_layers(model)
    return layers[0].config if layers else None


def apply_lora(model, config=LoRAConfig()):
    """Put rank-r updates on the chosen projections of every layer, in place; freeze everything else.
    The default LoRAConfig() is the paper's GPT-2 E2E setting: Wq and Wv, r = 4, alpha = 32 (a scale of 8)."""
    if lora_layers(model):
        c = config_of(model)
        raise UserError(f"this model already has LoRA layers (rank {c.rank}, targets {list(c.targets)})")
    for p in model.parameters():
        p.requires_grad_(False)  # W0 stays frozen: only A and B are trained
    C, targets = model.config.n_embd, config.targets
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        chosen = {t: s for t, s in qkv_slices(C).items() if t in targets}
        if chosen:
            attn.c_attn = LoRALinear(attn.c_attn, chosen, config)
        if "o" in targets:
            attn.c_proj = LoRALinear(attn.c_proj, {"o": (0, C)}, config)
        if "mlp" in targets:
            mlp.c_fc = LoRALinear(mlp.c_fc, {"mlp": (0, 4 * C)}, config)
            mlp.c_proj = LoRALinear(mlp.c_proj, {"mlp": (0, C)}, config)
    p = model.transformer.wte.weight
    model.to(device=p.device, dtype=p.dtype)  # A and B where and as the base weights are
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


def lora_state_dict(model):
    """{name: tensor} of every lora_A and lora_B, e.g. transformer.h.0.attn.c_attn.lora.q.lora_A: what an adapter
    file holds (checkpoints/adapters.py writes and reads it)."""
    return {name: p.detach() for name, p in model.named_parameters() if ".lora." in name}
