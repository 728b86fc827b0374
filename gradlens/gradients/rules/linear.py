"""Affine layers: ``nn.Linear`` (y = x Wᵀ + b, W is (out, in)) and transformers' ``Conv1D`` (y = x W + b, W is (in, out)).

The two differ only in how W is stored, so one set of functions serves both,
given the layout. Weight gradient of a group: Gᵀ A over its rows (a single
``addmm`` when added to the other groups' sum); per-row norms by the ghost-norm
identity where it is cheaper than materialising.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from .base import Probes, ProbeResult, Rule, RowSelector, Use, as_3d, dot_with_scale, flat, sum_with_scale
from .registry import register_rule


def _widths(m: nn.Module, transposed: bool) -> tuple[int, int]:
    """(in, out) features; ``transposed``: W is stored (in, out), as in Conv1D."""
    w = m.weight
    return (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])


def _grad_and_input(use: Use, rows: RowSelector, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's output gradients G (tokens, out) and inputs A (tokens, in) as autograd's own
    backward multiplies them: in the dtype the forward's product ran in, the output's (bf16
    under bf16 autocast, which casts A as the forward did; the layer's dtype otherwise)."""
    width_in, width_out = _widths(use.module, transposed)
    g = rows(use.grad()).reshape(-1, width_out)
    return g, rows(use.input()).reshape(-1, width_in).to(g.dtype)


def contribution(use: Use, rows: RowSelector, transposed: bool) -> dict[str, torch.Tensor]:
    """The group's Gᵀ A (and Σ G), the very product autograd computes over all rows, restricted
    to the group: same operand dtypes, same accumulation (bf16 products accumulate in float32
    inside the kernel and round once). Returned in that product's dtype, as autograd's is:
    the capture widens what it keeps to float32, so no conversion is made twice."""
    g, a = _grad_and_input(use, rows, transposed)
    out = {}
    if "weight" in use.wanted:
        out["weight"] = a.T @ g if transposed else g.T @ a
    if "bias" in use.wanted:
        out["bias"] = g.sum(0)
    return out


def add_contribution(use: Use, rows: RowSelector, base: dict, transposed: bool) -> dict[str, torch.Tensor]:
    """``base`` (the other groups' sum, from ``contribution``) plus the group's contribution,
    as one ``addmm`` (no temporary for the group), in the product's dtype."""
    g, a = _grad_and_input(use, rows, transposed)
    out = {}
    if "weight" in use.wanted:
        w = base["weight"]
        out["weight"] = torch.addmm(w, a.T, g) if transposed else torch.addmm(w, g.T, a)
    if "bias" in use.wanted:
        out["bias"] = base["bias"] + g.sum(0)
    return out


def probe(use: Use, probes: Probes, transposed: bool) -> ProbeResult:
    width_in, width_out = _widths(use.module, transposed)
    g, a = flat(use.grad(), width_out, use.dtype), flat(use.input(), width_in, use.dtype)
    out = {}
    if "weight" in use.wanted:
        v, z = probes["weight"]  # v along W's rows, z along its columns
        out["weight"] = dot_with_scale(a @ v, g @ z) if transposed else dot_with_scale(g @ v, a @ z)
    if "bias" in use.wanted:
        out["bias"] = sum_with_scale(g @ probes["bias"][0])
    return out


def per_row_sq(use: Use, transposed: bool) -> dict[str, torch.Tensor]:
    width_in, width_out = _widths(use.module, transposed)
    g = as_3d(use.grad(), width_out, use.dtype)
    out = {}
    if "weight" in use.wanted:
        out["weight"] = ghost_sq(as_3d(use.input(), width_in, use.dtype), g)
    if "bias" in use.wanted:
        out["bias"] = g.sum(1).pow(2).sum(1)
    return out


def ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-row ‖Σ_t g_t a_tᵀ‖² for a: (N, T, i), g: (N, T, o), choosing the cheaper route.

    Ghost norm (Goodfellow 2015; Li et al. 2022): Σ_{t,s} (a_t·a_s)(g_t·g_s),
    costing T²(i+o) per row; materialising costs T·i·o.
    """
    t = a.shape[1]
    if t * (a.shape[-1] + g.shape[-1]) < a.shape[-1] * g.shape[-1]:
        return ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))
    return torch.einsum("nto,nti->noi", g, a).pow(2).sum((1, 2))


def _affine_rule(name: str, transposed: bool, grad_input, splits) -> Rule:
    return Rule(
        name,
        partial(contribution, transposed=transposed),
        partial(probe, transposed=transposed),
        partial(per_row_sq, transposed=transposed),
        grad_input=grad_input,
        splits=splits,
        add_contribution=partial(add_contribution, transposed=transposed),
    )


@register_rule(nn.Linear)
def _linear() -> Rule:
    def grad_input(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
        return g @ m.weight.to(g.dtype)  # autocast: the forward's cast of W, replayed

    def splits(m: nn.Module) -> bool:
        return type(m).forward is nn.Linear.forward

    return _affine_rule("linear", False, grad_input, splits)


def is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


@register_rule(predicate=is_hf_conv1d)
def _conv1d() -> Rule:
    def grad_input(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
        return g @ m.weight.T.to(g.dtype)  # autocast: the forward's cast of W, replayed

    def splits(m: nn.Module) -> bool:
        forward = type(m).forward
        return forward.__qualname__ == "Conv1D.forward" and forward.__module__.startswith("transformers.")

    return _affine_rule("conv1d", True, grad_input, splits)
