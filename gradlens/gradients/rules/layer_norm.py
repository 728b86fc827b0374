"""``nn.LayerNorm``: y = x̂ ⊙ w + b, so a group's gradients are its row sums of g ⊙ x̂ (weight) and g (bias).

``row_sum_rule`` builds the rule of any norm layer of that shape from the
per-token terms; RMSNorm (``rms_norm.py``) uses it too. The terms are computed
once per use (``use.memo``) and every group sums its own rows of them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Probes, ProbeResult, Rule, RowSelector, Use
from .registry import register_rule

Terms = Callable[[Use], dict[str, torch.Tensor]]  # use -> {param: (N, tokens, width) terms}


def row_sum_rule(name: str, terms: Terms) -> Rule:
    """The rule of a layer whose parameter gradients are row sums of per-token ``terms``."""

    def contribution(use: Use, rows: RowSelector) -> dict[str, torch.Tensor]:
        return {p: rows(t).sum((0, 1)).reshape(getattr(use.module, p).shape) for p, t in terms(use).items()}

    def probe(use: Use, probes: Probes) -> ProbeResult:
        # The scale sums magnitudes before the row sum: rows whose gradients cancel exactly (a reward
        # model's chosen and rejected scores: Σ dL/dr = 0 reaches the final LayerNorm's bias) must
        # not shrink the rounding tolerance to the size of the cancelled sum.
        out = {}
        for p, t in terms(use).items():
            v = probes[p][0]
            out[p] = (t.sum((0, 1)) @ v, t.abs().sum((0, 1)) @ v.abs())
        return out

    def per_row_sq(use: Use) -> dict[str, torch.Tensor]:
        return {p: t.sum(1).pow(2).sum(1) for p, t in terms(use).items()}

    return Rule(name, contribution, probe, per_row_sq)


def layer_norm_terms(use: Use) -> dict[str, torch.Tensor]:
    """{weight: g ⊙ x̂, bias: g} for every token, as (N, tokens, width); memoised for this use."""
    if "terms" not in use.memo:
        m = use.module
        n, width = use.input().shape[0], int(torch.Size(m.normalized_shape).numel())
        g = use.grad().to(use.dtype).reshape(n, -1, width)
        xhat = F.layer_norm(use.input().to(use.dtype), m.normalized_shape, None, None, m.eps).reshape(n, -1, width)
        use.memo["terms"] = {"weight": g * xhat, "bias": g}
    return {p: t for p, t in use.memo["terms"].items() if p in use.wanted}


@register_rule(nn.LayerNorm)
def _layer_norm() -> Rule:
    return row_sum_rule("layernorm", layer_norm_terms)
