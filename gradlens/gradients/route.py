"""The split backward: a layer's weight gradient reduced over rows group by group, at no extra cost.

Autograd computes a linear layer's weight gradient as one reduction over rows,
Gᵀ A. Splitting it into the chosen rows and the rejected rows,
G_cᵀ A_c + G_rᵀ A_r, costs the same products, and yields both groups' pieces.
So, for layers whose rule has an exact ``grad_input``, the recorder's forward
hook re-parents the layer's output (same tensor storage, same values) onto
``SplitBackward``, whose backward computes the input gradient itself and asks the
open capture (if any) for the weight and bias gradients, which the capture
returns as the sum of the groups' pieces. With no capture open the weight
gradient is one product, as usual.

The original output's graph is dropped the moment the hook returns, so memory is
unchanged. ``p.grad`` is the same sum taken in a different order: equal up to
float rounding, not bit for bit (``GradientRecorder(model, split_backward=False)``
keeps the plain backward and bit-identical gradients).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn as nn

from .rules import Rule, Use

# (use) -> {param name: full gradient}; given by the recorder, asks the open capture
WeightGrads = Callable[[Use], dict[str, torch.Tensor]]

FLOATING = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def can_route(rule: Rule, module: nn.Module, args: tuple, kwargs: dict, output) -> bool:
    """Only where our backward gives autograd's numbers: one plain floating input, and operands
    whose dtypes the backward can replay: all of the layer's own dtype, or, under autocast, a
    product autocast ran in its low-precision dtype (the backward re-casts W and A the same way)."""
    if rule.grad_input is None or rule.splits is None or not rule.splits(module):
        return False  # a subclass with its own forward: its backward is not ours to write
    if kwargs or len(args) != 1 or not isinstance(output, torch.Tensor):
        return False
    x = args[0]
    if not isinstance(x, torch.Tensor) or not output.requires_grad:
        return False
    dtypes = {x.dtype} | {p.dtype for p in module.parameters(recurse=False)}
    device = output.device.type
    if torch.is_autocast_enabled(device):  # the product ran in autocast's dtype, from float32 (or own-dtype) operands
        low = torch.get_autocast_dtype(device)
        return output.dtype == low and dtypes <= {torch.float32, low}
    return dtypes == {output.dtype} and output.dtype in FLOATING


class SplitBackward(torch.autograd.Function):
    """Identity on the layer's already computed output; its backward is the layer's backward."""

    @staticmethod
    def forward(ctx, output, x, weight, bias, use: Use, rule: Rule, weight_grads: WeightGrads):
        ctx.save_for_backward(x)
        ctx.use, ctx.rule, ctx.weight_grads = use, rule, weight_grads
        return output

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        use = replace(ctx.use, args=(x,), grad_outputs=(g,))  # this backward's use: dropped when it returns
        gx = ctx.rule.grad_input(use.module, g).to(x.dtype) if ctx.needs_input_grad[1] else None  # autocast: cast back
        grads = ctx.weight_grads(use)  # in each parameter's own dtype
        return None, gx, grads.get("weight"), grads.get("bias"), None, None, None


def route(output: torch.Tensor, x: torch.Tensor, module: nn.Module, use: Use, rule: Rule, weight_grads: WeightGrads) -> torch.Tensor:
    """``output`` re-parented onto ``SplitBackward`` (a view of the same storage)."""
    weight = module.weight if "weight" in use.wanted else None
    bias: Optional[torch.Tensor] = module.bias if "bias" in use.wanted else None
    use = replace(use, args=(), kwargs={})  # x lives in the autograd context only (checkpointing can free it)
    return SplitBackward.apply(output.detach(), x, weight, bias, use, rule, weight_grads)
