"""Per-layer rules: one pure function per layer type, plus an exact generic fallback.

A rule turns one *use* of a module (its inputs, as seen by a forward hook, and
the gradient of its output, as seen in backward) into the gradient that a
subset of rows contributes to each of the module's own parameters:

    contribution(use, rows) -> {param_name: tensor shaped like the parameter}

``rows`` selects rows along dim 0 (``rows(x)`` returns ``x`` restricted to the
group). A rule may also give ``probe(use, vectors)``: the scalar ⟨v zᵀ, ∂L/∂W⟩
of the contribution of *all* rows against a fixed rank-1 probe, computed
without forming the matrix. The recorder compares the probes of every use of a
parameter against the same probe of the parameter's real gradient; a mismatch
means some of the gradient arrived through a path no hook saw (a fused kernel
reading ``module.weight`` directly) and the parameter is reported unattributed.

Rules see tensors already cast to the accumulation dtype (float32, or float64
for float64 parameters), so bf16/fp16 activations are accumulated in float32.

Precondition (checked by ``validate`` when a recorder attaches): rows are
independent along dim 0. Row i's output depends only on row i's input, so the
gradient of a group of rows is the sum of per-row pieces. Modules whose output
for one row depends on other rows (BatchNorm normalises with batch statistics)
break this, and the recorder refuses them, as Opacus's validator does.

A rule with ``grad_input`` can also *split* the layer's backward: the recorder
routes the layer's output through a small autograd function whose backward
computes the input gradient with ``grad_input`` and the weight gradient as the
sum of the groups' ``contribution``s. That is the same reduction over rows,
partitioned, so the split costs no extra matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .precision import AutocastState, autocast_as

RowSelector = Callable[[torch.Tensor], torch.Tensor]
Probes = dict[str, tuple[torch.Tensor, ...]]  # param name -> (v,) for 1-D, (v, z) for 2-D
# A probe result: (value, scale); scale bounds the magnitudes summed, for a rounding tolerance.
ProbeResult = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Use:
    """One forward call of a module, completed by its output gradients in backward."""

    module: nn.Module
    args: tuple
    kwargs: dict
    grad_outputs: tuple  # one entry per tensor output (None where it got no gradient)
    wanted: tuple[str, ...]  # names of the module's own parameters that need gradients
    dtype: torch.dtype  # accumulation dtype
    rng_state: Optional[tuple] = None  # (cpu_state, (cuda_device, cuda_state) | None) before forward
    recompute: Optional[Callable] = None  # set by the recorder: runs fn with its own hooks paused
    cache: Optional[dict] = None  # recompute rules keep their re-run forward here
    autocast: AutocastState = ()  # autocast contexts enabled during the forward (replayed by recompute rules)

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
    # True when ``contribution`` re-runs the module (cost per group, not per row slice):
    # then every group is computed explicitly and the probe comes from the groups' sum.
    recompute: bool = False
    # (module, output gradient) -> input gradient, for a one-input module with an
    # exact formula; lets the recorder split the layer's own backward (see above).
    grad_input: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None
    # module -> whether its forward is exactly the one ``grad_input`` differentiates (not a
    # subclass overriding forward); only then is the layer's backward split.
    splits: Optional[Callable[[nn.Module], bool]] = None
    # (use, rows, base) -> {param: base[param] + contribution}, as one fused operation
    # (``addmm``), so that the split's full gradient needs no extra temporary.
    add_contribution: Optional[Callable[[Use, RowSelector, dict], dict[str, torch.Tensor]]] = None


_BY_TYPE: dict[type, Rule] = {}
_BY_PREDICATE: list[tuple[Callable[[nn.Module], bool], Rule]] = []
_BY_NAME: dict[str, Rule] = {}


def register_rule(*module_types: type, predicate: Callable[[nn.Module], bool] | None = None):
    """Decorator: ``@register_rule(MyLayer)`` on a function returning a ``Rule``.

    The rule is used for ``MyLayer`` and its subclasses (or for every module where
    ``predicate(module)`` is true). Registering a rule name or a module type twice
    raises, like the other gradlens registries. Returns the ``Rule``.
    """
    if not module_types and predicate is None:
        raise ValueError("register_rule needs module types or a predicate")

    def decorate(build: Callable[[], Rule]) -> Rule:
        rule = build()
        if not isinstance(rule, Rule):
            raise TypeError(f"@register_rule: {build.__name__} must return a Rule, got {type(rule).__name__}")
        if rule.name in _BY_NAME or rule.name == "fallback":
            raise ValueError(f"a recorder rule named {rule.name!r} is already registered")
        for t in module_types:
            if t in _BY_TYPE:
                raise ValueError(f"{t.__name__} already has the recorder rule {_BY_TYPE[t].name!r}")
        _BY_NAME[rule.name] = rule
        for t in module_types:
            _BY_TYPE[t] = rule
        if predicate is not None:
            _BY_PREDICATE.append((predicate, rule))
        return rule

    return decorate


# Modules whose output for one row depends on other rows of the batch.
ROW_MIXING = (nn.modules.batchnorm._BatchNorm,)


def validate(model: nn.Module) -> None:
    """Refuse models that break the rows-are-independent precondition, naming the module."""
    for path, module in model.named_modules():
        if isinstance(module, ROW_MIXING):
            raise ValueError(
                f"module {path or '(model)'!r} ({type(module).__name__}) mixes the rows of a batch: its statistics are "
                "taken over dim 0, so the gradient of one group of rows is not defined on its own. gradlens needs rows "
                "that are independent along dim 0; use LayerNorm or GroupNorm instead (as Opacus requires too)"
            )


def rule_for(module: nn.Module) -> Rule:
    """The registered rule for ``module``'s type (walking its MRO), else the fallback."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    for predicate, rule in _BY_PREDICATE:
        if predicate(module):
            return rule
    return FALLBACK


def _flat(x: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, ..., width) -> (N * ..., width) in the accumulation dtype."""
    return x.reshape(-1, width).to(dtype)


def _ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-row ‖Σ_t g_t a_tᵀ‖² for a: (N, T, i), g: (N, T, o), choosing the cheaper route.

    Ghost norm (Goodfellow 2015; Li et al. 2022): Σ_{t,s} (a_t·a_s)(g_t·g_s),
    costing T²(i+o) per row; materialising costs T·i·o.
    """
    t = a.shape[1]
    if t * (a.shape[-1] + g.shape[-1]) < a.shape[-1] * g.shape[-1]:
        return ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))
    return torch.einsum("nto,nti->noi", g, a).pow(2).sum((1, 2))


def _as_3d(x: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, width).to(dtype)


def _dot_with_scale(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x @ y, x.abs() @ y.abs()


def _sum_with_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.sum(), x.abs().sum()


# ---- nn.Linear: y = x Wᵀ + b ---------------------------------------------------------------


@register_rule(nn.Linear)
def _linear() -> Rule:
    def contribution(use: Use, rows: RowSelector) -> dict[str, torch.Tensor]:
        m = use.module
        g = _flat(rows(use.grad()), m.out_features, use.dtype)
        out = {}
        if "weight" in use.wanted:
            out["weight"] = g.T @ _flat(rows(use.input()), m.in_features, use.dtype)
        if "bias" in use.wanted:
            out["bias"] = g.sum(0)
        return out

    def probe(use: Use, probes: Probes) -> ProbeResult:
        m = use.module
        g = _flat(use.grad(), m.out_features, use.dtype)
        out = {}
        if "weight" in use.wanted:
            v, z = probes["weight"]
            out["weight"] = _dot_with_scale(g @ v, _flat(use.input(), m.in_features, use.dtype) @ z)
        if "bias" in use.wanted:
            out["bias"] = _sum_with_scale(g @ probes["bias"][0])
        return out

    def per_row_sq(use: Use) -> dict[str, torch.Tensor]:
        m = use.module
        g = _as_3d(use.grad(), m.out_features, use.dtype)
        out = {}
        if "weight" in use.wanted:
            out["weight"] = _ghost_sq(_as_3d(use.input(), m.in_features, use.dtype), g)
        if "bias" in use.wanted:
            out["bias"] = g.sum(1).pow(2).sum(1)
        return out

    def add_contribution(use: Use, rows: RowSelector, base: dict) -> dict[str, torch.Tensor]:
        m = use.module
        g = _flat(rows(use.grad()), m.out_features, use.dtype)
        out = {}
        if "weight" in use.wanted:
            out["weight"] = torch.addmm(base["weight"], g.T, _flat(rows(use.input()), m.in_features, use.dtype))
        if "bias" in use.wanted:
            out["bias"] = base["bias"] + g.sum(0)
        return out

    def grad_input(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
        return g @ m.weight

    def splits(m: nn.Module) -> bool:
        return type(m).forward is nn.Linear.forward

    return Rule("linear", contribution, probe, per_row_sq, grad_input=grad_input, splits=splits, add_contribution=add_contribution)


# ---- transformers Conv1D (GPT-2): y = x W + b, W is (in, out) -------------------------------


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


@register_rule(predicate=_is_hf_conv1d)
def _conv1d() -> Rule:
    def contribution(use: Use, rows: RowSelector) -> dict[str, torch.Tensor]:
        w = use.module.weight
        g = _flat(rows(use.grad()), w.shape[1], use.dtype)
        out = {}
        if "weight" in use.wanted:
            out["weight"] = _flat(rows(use.input()), w.shape[0], use.dtype).T @ g
        if "bias" in use.wanted:
            out["bias"] = g.sum(0)
        return out

    def probe(use: Use, probes: Probes) -> ProbeResult:
        w = use.module.weight
        g = _flat(use.grad(), w.shape[1], use.dtype)
        out = {}
        if "weight" in use.wanted:
            v, z = probes["weight"]
            out["weight"] = _dot_with_scale(_flat(use.input(), w.shape[0], use.dtype) @ v, g @ z)
        if "bias" in use.wanted:
            out["bias"] = _sum_with_scale(g @ probes["bias"][0])
        return out

    def per_row_sq(use: Use) -> dict[str, torch.Tensor]:
        w = use.module.weight
        g = _as_3d(use.grad(), w.shape[1], use.dtype)
        out = {}
        if "weight" in use.wanted:
            out["weight"] = _ghost_sq(_as_3d(use.input(), w.shape[0], use.dtype), g)
        if "bias" in use.wanted:
            out["bias"] = g.sum(1).pow(2).sum(1)
        return out

    def add_contribution(use: Use, rows: RowSelector, base: dict) -> dict[str, torch.Tensor]:
        w = use.module.weight
        g = _flat(rows(use.grad()), w.shape[1], use.dtype)
        out = {}
        if "weight" in use.wanted:
            out["weight"] = torch.addmm(base["weight"], _flat(rows(use.input()), w.shape[0], use.dtype).T, g)
        if "bias" in use.wanted:
            out["bias"] = base["bias"] + g.sum(0)
        return out

    def grad_input(m: nn.Module, g: torch.Tensor) -> torch.Tensor:
        return g @ m.weight.T

    def splits(m: nn.Module) -> bool:
        forward = type(m).forward
        return forward.__qualname__ == "Conv1D.forward" and forward.__module__.startswith("transformers.")

    return Rule("conv1d", contribution, probe, per_row_sq, grad_input=grad_input, splits=splits, add_contribution=add_contribution)


# ---- nn.Embedding: rows of W indexed by token ids --------------------------------------------


def _embedding_grads(use: Use, ids: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened ids and output grads, with padding rows zeroed and frequency scaling applied."""
    m = use.module
    ids = ids.reshape(-1)
    g = _flat(g, m.embedding_dim, use.dtype)
    if m.scale_grad_by_freq:
        # PyTorch scales by the token's frequency in the *whole* input, not in the group.
        counts = torch.bincount(use.input().reshape(-1), minlength=m.num_embeddings)
        g = g / counts[ids].unsqueeze(1).to(g.dtype)
    if m.padding_idx is not None:
        g = g * (ids != m.padding_idx).unsqueeze(1).to(g.dtype)
    return ids, g


@register_rule(nn.Embedding)
def _embedding() -> Rule:
    def contribution(use: Use, rows: RowSelector) -> dict[str, IndexedRows]:
        ids, g = _embedding_grads(use, rows(use.input()), rows(use.grad()))
        return {"weight": IndexedRows(ids, g, use.module.weight.shape)}

    def probe(use: Use, probes: Probes) -> ProbeResult:
        v, z = probes["weight"]
        ids, g = _embedding_grads(use, use.input(), use.grad())
        return {"weight": _dot_with_scale(v[ids], g @ z)}

    def per_row_sq(use: Use) -> dict[str, torch.Tensor]:
        # Ghost norm for lookups: Σ_{t,s} [id_t = id_s] (g_t·g_s).
        n = use.input().shape[0]
        ids, g = _embedding_grads(use, use.input(), use.grad())
        ids, g = ids.reshape(n, -1), g.reshape(n, ids.numel() // n, -1)
        same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
        return {"weight": (same * (g @ g.transpose(1, 2))).sum((1, 2))}

    return Rule("embedding", contribution, probe, per_row_sq)


# ---- nn.LayerNorm: y = x̂ ⊙ w + b -------------------------------------------------------------


def _layer_norm_terms(use: Use) -> tuple[torch.Tensor, torch.Tensor]:
    """(g ⊙ x̂, g) for every row, flattened to (N, tokens, width); computed once per use."""
    if use.cache is None:
        use.cache = {}
    if "gx" not in use.cache:
        m = use.module
        n, width = use.input().shape[0], int(torch.Size(m.normalized_shape).numel())
        g = use.grad().to(use.dtype).reshape(n, -1, width)
        xhat = F.layer_norm(use.input().to(use.dtype), m.normalized_shape, None, None, m.eps).reshape(n, -1, width)
        use.cache["gx"], use.cache["g"] = g * xhat, g
    return use.cache["gx"], use.cache["g"]


@register_rule(nn.LayerNorm)
def _layer_norm() -> Rule:
    # LayerNorm's gradients are row sums of g ⊙ x̂ (weight) and g (bias).
    def terms(use: Use) -> dict[str, torch.Tensor]:
        gx, g = _layer_norm_terms(use)
        return {name: t for name, t in (("weight", gx), ("bias", g)) if name in use.wanted}

    def contribution(use: Use, rows: RowSelector) -> dict[str, torch.Tensor]:
        shape = use.module.normalized_shape
        return {name: rows(t).sum((0, 1)).reshape(shape) for name, t in terms(use).items()}

    def probe(use: Use, probes: Probes) -> ProbeResult:
        # The scale sums magnitudes before the row sum: rows whose gradients cancel exactly (a reward
        # model's chosen and rejected scores: Σ dL/dr = 0 reaches the final LayerNorm's bias) must
        # not shrink the rounding tolerance to the size of the cancelled sum.
        out = {}
        for name, t in terms(use).items():
            v = probes[name][0]
            out[name] = (t.sum((0, 1)) @ v, t.abs().sum((0, 1)) @ v.abs())
        return out

    def per_row_sq(use: Use) -> dict[str, torch.Tensor]:
        return {name: t.sum(1).pow(2).sum(1) for name, t in terms(use).items()}

    return Rule("layernorm", contribution, probe, per_row_sq)


# ---- Recompute rules: elementwise norms (RMSNorm and friends) and the generic fallback ------


def _recomputed(use: Use):
    """Re-run the module's own forward on the *whole* batch, once per use (cached).

    Called functionally with detached copies of the module's own parameters, and
    with the CPU/CUDA RNG replayed, so dropout draws the very same masks: rows must
    not be sliced before the forward, or the masks would differ.
    """
    if use.cache is None:
        use.cache = {}
    if "outputs" not in use.cache:
        m = use.module
        params = {name: p.detach().requires_grad_(True) for name, p in m.named_parameters(recurse=False) if name in use.wanted}

        def run():
            cuda = use.rng_state[1] if use.rng_state is not None else None
            with torch.enable_grad(), torch.random.fork_rng(devices=[cuda[0]] if cuda else []), autocast_as(use.autocast):
                if use.rng_state is not None:
                    torch.random.set_rng_state(use.rng_state[0])
                    if cuda:
                        torch.cuda.set_rng_state(cuda[1], cuda[0])
                return functional_call(m, params, use.args, use.kwargs, strict=False)

        outputs = use.recompute(run) if use.recompute is not None else run()
        use.cache["outputs"], use.cache["params"] = tensor_leaves(outputs), params
    return use.cache["outputs"], use.cache["params"]


def _keep_rows(g: torch.Tensor, rows: RowSelector) -> torch.Tensor:
    """``g`` with every row outside ``rows`` zeroed."""
    index = rows(torch.arange(g.shape[0], device=g.device))
    return torch.zeros_like(g).index_copy_(0, index, g.index_select(0, index))


def _vjp_of_rows(use: Use, rows: RowSelector) -> dict[str, torch.Tensor]:
    """Exact contribution of the selected rows: their output gradients pulled back
    through the module's own forward (recomputed once per use)."""
    outputs, params = _recomputed(use)
    pairs = [(o, _keep_rows(g, rows)) for o, g in zip(outputs, use.grad_outputs) if g is not None and o.requires_grad]
    grads = torch.autograd.grad(
        [o for o, _ in pairs], list(params.values()), [g for _, g in pairs], retain_graph=True, allow_unused=True
    )
    return {name: (torch.zeros_like(p) if gr is None else gr).to(use.dtype) for (name, p), gr in zip(params.items(), grads)}


def tensor_leaves(outputs, floating: bool = True) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_leaves

    return [o for o in tree_leaves(outputs) if isinstance(o, torch.Tensor) and (o.is_floating_point() or not floating)]


def _recompute_probe(use: Use, probes: Probes) -> ProbeResult:
    parts = _vjp_of_rows(use, lambda x: x)
    return {name: probe_dense(t, probes[name]) for name, t in parts.items()}


def probe_dense(t: torch.Tensor, vectors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """⟨v zᵀ, t⟩ (or ⟨v, t⟩ for 1-D probes) of an explicit tensor, with its magnitude scale."""
    if len(vectors) == 2:
        v, z = vectors
        t2 = t.reshape(t.shape[0], -1)
        return v @ t2 @ z, v.abs() @ t2.abs() @ z.abs()
    return _dot_with_scale(t.reshape(-1), vectors[0])


def _recompute_per_row_sq(use: Use) -> dict[str, torch.Tensor]:
    n = use.grad_outputs[0].shape[0]
    per_row = [_vjp_of_rows(use, lambda x, i=i: x[i : i + 1]) for i in range(n)]
    return {name: torch.stack([r[name].pow(2).sum() for r in per_row]) for name in use.wanted}


def _is_rms_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    own = [n for n, _ in module.named_parameters(recurse=False)]
    return ("RMSNorm" in name or name == "T5LayerNorm") and own == ["weight"]


@register_rule(predicate=_is_rms_norm)
def _rms_norm() -> Rule:
    # Elementwise weights whose formula varies by model (float32 upcast, 1 + w, ...):
    # re-running the module's own forward is exact for all of them and cheap.
    return Rule("rmsnorm", _vjp_of_rows, _recompute_probe, _recompute_per_row_sq, recompute=True)


FALLBACK = Rule("fallback", _vjp_of_rows, _recompute_probe, _recompute_per_row_sq, recompute=True)
