"""Opt-in layouts for faster one-token steps on some CPUs; model.py and the lesson never import this file.
tools/bench.py (section 3) times each beside the plain model, so use one only where that table says it wins.

transposed_weights(model) keeps every weight of the model's Linears (and the tied wte / head) as the transpose of
a contiguous (in, out) matrix: the same nn.Linear weight (out, in), as a view, with the same values. F.linear then
hands BLAS the other transposition, so a one-token step runs a different matrix-vector kernel. Whether that kernel
streams the weights faster depends on the CPU and the BLAS: with MKL on an AMD EPYC the head (50257 x 768) read
at ~20 GB/s instead of ~12.5 GB/s; on another machine it may be slower. The logits agree to float rounding (the
sums run in another order), not bit for bit.

packed_weights(model, batch_size): every Linear (the tied head included) also keeps its weight in MKL's packed
GEMM format for inputs of batch_size rows: the kernel torch.compile's CPU freezing pass puts in place of fp32
linears (torch.ops.mkl._mkl_linear). A one-token step of generate at batch B has B rows, so pack for B; other row
counts (the prompt's forward) take the plain kernel. Measured on an Intel Xeon with AMX (2026-12-03): at 8 rows a
768 x 3072 product took 0.21 ms instead of 0.51, and the head 7.1 ms instead of 14.6; at 1 row, no gain. The
packed copies double the weights' memory and do not follow later edits of the weights (merge LoRA first); the
logits agree to float rounding.
"""

import torch
import torch.nn as nn

from lora import LoRALinear
from plumbing.errors import UserError


def transposed(weight):
    """The same (out, in) values as a view of a contiguous (in, out) tensor, as a frozen parameter."""
    return nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)


@torch.no_grad()
def transposed_weights(model):
    """Store model's Linear weights, and the tied wte / lm_head, transposed in memory (see the module's
    docstring); for inference: the new weights are frozen. Returns model."""
    head = model.lm_head
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            module.weight = transposed(module.weight)
    tied = head.weight is model.transformer.wte.weight
    model.transformer.wte.weight = transposed(model.transformer.wte.weight)
    head.weight = model.transformer.wte.weight if tied else transposed(head.weight)
    return model


class PackedLinear(nn.Module):
    """y = x W^T + b, with W also packed by MKL for inputs of batch_size rows (see the module's docstring)."""

    def __init__(self, linear, batch_size):
        super().__init__()
        self.weight, self.bias, self.batch_size = linear.weight, linear.bias, batch_size
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), batch_size)

    def forward(self, x):
        return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.batch_size)


@torch.no_grad()
def packed_weights(model, batch_size):
    """Replace every nn.Linear of model (the head included, still tied to wte) by a PackedLinear for batch_size
    rows; for inference. Returns model."""
    if not torch.backends.mkl.is_available():
        raise UserError("packed_weights needs a PyTorch built with MKL (the x86 CPU builds are)")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise UserError("packed_weights takes a model without LoRA layers: merge the adapter first (merge.py), as "
                        "a packed copy would not follow the update")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child, batch_size).requires_grad_(False))
    return model
