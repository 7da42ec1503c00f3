"""An opt-in layout for faster one-token steps on some CPUs; model.py and the lesson never import this file.

transposed_weights(model) keeps every weight of the model's Linears (and the tied wte / head) as the transpose of
a contiguous (in, out) matrix: the same nn.Linear weight (out, in), as a view, with the same values. F.linear
then hands BLAS the other transposition, so a one-token step runs a different matrix-vector kernel. Whether that
kernel streams the weights faster depends on the CPU and the BLAS: with MKL on an AMD EPYC the head (50257 x 768)
read at ~20 GB/s instead of ~12.5 GB/s; on another machine it may be slower. tools/bench.py (section 3) times
both layouts side by side, so use it only where that table says it wins. The logits agree to float rounding (the
sums run in another order), not bit for bit.
"""

import torch
import torch.nn as nn


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
