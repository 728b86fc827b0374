"""``nn.Embedding``: rows of W indexed by token ids.

A group's contribution is sparse: the output gradients of its tokens, added
into the rows of the ids they looked up (``IndexedRows``), never a dense
vocabulary-sized tensor unless the capture needs one.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import IndexedRows, Probes, ProbeResult, Rule, RowSelector, Use, dot_with_scale, flat
from .registry import register_rule


def _ids_and_grads(use: Use, ids: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened ids and output grads, with padding rows zeroed and frequency scaling applied."""
    m = use.module
    ids = ids.reshape(-1)
    g = flat(g, m.embedding_dim, use.dtype)
    if m.scale_grad_by_freq:
        # PyTorch scales by the token's frequency in the *whole* input, not in the group.
        counts = torch.bincount(use.input().reshape(-1), minlength=m.num_embeddings)
        g = g / counts[ids].unsqueeze(1).to(g.dtype)
    if m.padding_idx is not None:
        g = g * (ids != m.padding_idx).unsqueeze(1).to(g.dtype)
    return ids, g


def contribution(use: Use, rows: RowSelector) -> dict[str, IndexedRows]:
    ids, g = _ids_and_grads(use, rows(use.input()), rows(use.grad()))
    return {"weight": IndexedRows(ids, g, use.module.weight.shape)}


def probe(use: Use, probes: Probes) -> ProbeResult:
    v, z = probes["weight"]
    ids, g = _ids_and_grads(use, use.input(), use.grad())
    return {"weight": dot_with_scale(v[ids], g @ z)}


def per_row_sq(use: Use) -> dict[str, torch.Tensor]:
    # Ghost norm for lookups: Σ_{t,s} [id_t = id_s] (g_t·g_s).
    n = use.input().shape[0]
    ids, g = _ids_and_grads(use, use.input(), use.grad())
    ids, g = ids.reshape(n, -1), g.reshape(n, ids.numel() // n, -1)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
    return {"weight": (same * (g @ g.transpose(1, 2))).sum((1, 2))}


@register_rule(nn.Embedding)
def _embedding() -> Rule:
    return Rule("embedding", contribution, probe, per_row_sq, sparse_rows=lambda use: use.input().reshape(-1))
