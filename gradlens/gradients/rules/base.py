"""What a rule is given (``Use``), what it returns (tensors or ``IndexedRows``), and what it is (``Rule``).

A rule turns one *use* of a module (its inputs, as seen by a forward hook, and
the gradient of its output, as seen in backward) into the gradient that a
subset of rows contributes to each of the module's own parameters:

    contribution(use, rows) -> {param_name: tensor shaped like the parameter}

``rows`` selects rows along dim 0 (``rows(x)`` returns ``x`` restricted to the
group). A rule also gives ``probe(use, vectors)``: the scalar ⟨v zᵀ, ∂L/∂W⟩
of the contribution of *all* rows against a fixed rank-1 probe, computed
without forming the matrix. The recorder compares the probes of every use of a
parameter against the same probe of the parameter's real gradient; a mismatch
means some of the gradient arrived through a path no hook saw (a fused kernel
reading ``module.weight`` directly) and the parameter is reported unattributed.

Rules are functions of the use. A ``Use`` is immutable, except ``use.memo``:
intermediate results of that one use (LayerNorm's g ⊙ x̂, a re-run forward)
that every group's contribution shares, so they are computed once per use.
The tensors a rule sees are the module's own (bf16 under autocast or with bf16
weights). Most rules cast them to ``use.dtype`` (float32, or float64 for float64
parameters) before reducing over rows; the linear rules instead replay autograd's own
product (same operand dtypes, float32 accumulation inside the kernel) and return it in
that product's dtype. The capture keeps every piece in ``use.dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..precision import AutocastState

RowSelector = Callable[[torch.Tensor], torch.Tensor]
Probes = dict[str, tuple[torch.Tensor, ...]]  # param name -> (v,) for 1-D, (v, z) for 2-D
# A probe result per parameter: (value, scale); scale bounds the magnitudes summed, for a rounding tolerance.
ProbeResult = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _call(fn: Callable[[], Any]) -> Any:
    return fn()


@dataclass(frozen=True)
class Use:
    """One forward call of a module, completed by its output gradients in backward."""

    module: nn.Module
    args: tuple
    kwargs: dict
    grad_outputs: tuple  # one entry per tensor output (None where it got no gradient)
    wanted: tuple[str, ...]  # names of the module's own parameters that need gradients
    dtype: torch.dtype  # accumulation dtype
    rng_state: Optional[tuple] = None  # (cpu_state, (cuda_device, cuda_state) | None) before forward
    autocast: AutocastState = ()  # autocast contexts enabled during the forward
    # Runs a function with the recorder's hooks paused: a rule that re-runs the module's
    # forward must not record that forward as a new use.
    run_unhooked: Callable[[Callable[[], Any]], Any] = _call
    memo: dict = field(default_factory=dict, init=False, compare=False)  # this use's shared intermediates

    def input(self, i: int = 0) -> torch.Tensor:
        return self.args[i]

    def grad(self) -> torch.Tensor:
        return self.grad_outputs[0]


@dataclass(frozen=True)
class IndexedRows:
    """A sparse contribution: ``values[k]`` adds to row ``index[k]`` of the parameter."""

    index: torch.Tensor
    values: torch.Tensor
    shape: torch.Size

    def dense(self) -> torch.Tensor:
        # the kernel autograd itself uses for embeddings (much faster than zeros + index_add_)
        return torch.ops.aten.embedding_dense_backward(self.values, self.index, self.shape[0], -1, False).reshape(self.shape)


@dataclass(frozen=True)
class Rule:
    name: str
    contribution: Callable[[Use, RowSelector], dict[str, torch.Tensor]]
    probe: Optional[Callable[[Use, Probes], ProbeResult]] = None
    # Per-row squared norms for every row, for a module used once: {param: (N,)}.
    per_row_sq: Optional[Callable[[Use], dict[str, torch.Tensor]]] = None
    # True when ``contribution`` re-runs the module's forward (cost per group, not per row
    # slice): then every group is computed explicitly and the probe comes from their sum.
    reruns_forward: bool = False
    # (module, output gradient) -> input gradient, for a one-input module with an
    # exact formula; lets the recorder split the layer's own backward (see route.py).
    grad_input: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None
    # module -> whether its forward is exactly the one ``grad_input`` differentiates (not a
    # subclass overriding forward); only then is the layer's backward split.
    splits: Optional[Callable[[nn.Module], bool]] = None
    # (use, rows, base) -> {param: base[param] + contribution}, as one fused operation
    # (``addmm``), so that the split's full gradient needs no extra temporary.
    add_contribution: Optional[Callable[[Use, RowSelector, dict], dict[str, torch.Tensor]]] = None
    # use -> the parameter rows it touches (an embedding's token ids), for a rule whose
    # contributions are sparse rows; known at forward time.
    sparse_rows: Optional[Callable[[Use], torch.Tensor]] = None


# ---- small shared pieces ---------------------------------------------------------------------


def flat(x: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, ..., width) -> (N * ..., width) in the accumulation dtype."""
    return x.reshape(-1, width).to(dtype)


def as_3d(x: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, ..., width) -> (N, tokens, width) in the accumulation dtype."""
    return x.reshape(x.shape[0], -1, width).to(dtype)


def dot_with_scale(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x @ y, x.abs() @ y.abs()


def sum_with_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.sum(), x.abs().sum()


def probe_dense(t: torch.Tensor, vectors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """⟨v zᵀ, t⟩ (or ⟨v, t⟩ for 1-D probes) of an explicit tensor, with its magnitude scale."""
    if len(vectors) == 2:
        v, z = vectors
        t2 = t.reshape(t.shape[0], -1)
        return v @ t2 @ z, v.abs() @ t2.abs() @ z.abs()
    return dot_with_scale(t.reshape(-1), vectors[0])


def tensor_leaves(outputs, floating: bool = True) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [o for o in tree_leaves(outputs) if isinstance(o, torch.Tensor) and (o.is_floating_point() or not floating)]
