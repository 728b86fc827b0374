"""One capture: the per-group gradient pieces of one or more backward passes, and their norms.

During backward the recorder hands every module use to ``Capture.add_use``,
which asks the layer's rule for each group's contribution and accumulates it
per parameter (tied parameters share one accumulator, so every use is summed).
Each parameter's real gradient arrives through a tensor hook (``add_total``).

When the groups cover every row exactly once, the last group is never computed:
it is the real gradient minus the other groups. That saves one matrix product
per layer. A rank-1 random probe of every use is compared with the same probe
of the real gradient, so a gradient that reached a parameter through a path no
hook saw (a fused kernel reading ``weight`` directly) is detected and the
parameter is reported as *unattributed* instead of being mis-split.

Norms are computed once, at the end of the capture, in float32 (float64 for
float64 parameters) and the buffers are freed.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional

import pandas as pd
import torch

from .groups import GroupSpec, RowGroups, make_groups
from .rules import RECOMPUTE_RULES, IndexedRows, Rule, Use, probe_dense

if TYPE_CHECKING:
    from .recorder import GradientRecorder


class UnattributedGradientWarning(UserWarning):
    """Some parameter gradient arrived through a path no hook saw; it is left out of the split."""


# Rounding tolerance of the probe check, relative to the magnitudes summed. When the
# model itself computed in bf16/fp16 (autocast), its gradient carries that rounding.
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}
LOW_PRECISION_RTOL = 3e-2
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class ParamState:
    param: torch.nn.Parameter
    name: str
    modules: list[str]
    dtype: torch.dtype
    total_is_grad: bool = False  # p.grad was None when the capture began: at the end it *is* the total
    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    probe_hooks: float | torch.Tensor = 0.0
    probe_scale: float | torch.Tensor = 0.0
    rules: set[str] = field(default_factory=set)
    uses: int = 0
    low_precision: bool = False  # some use ran in bf16/fp16
    row_uses: int = 0  # uses in the current per-row segment
    row_sq: Optional[torch.Tensor] = None  # ghost per-row squared norms (single use)
    row_parts: Optional[torch.Tensor] = None  # materialised per-row gradients (tied / reused)
    # results
    sq: dict[str, float] = field(default_factory=dict)
    dots: dict[tuple[str, str], float] = field(default_factory=dict)
    total_sq: float = 0.0
    unattributed: bool = False
    pieces: dict[str, torch.Tensor] = field(default_factory=dict)  # kept only with keep_pieces=True

    def add(self, bucket: str, t) -> None:
        if isinstance(t, IndexedRows):  # sparse rows (embeddings): add in place, no dense temporary
            if bucket not in self.groups:
                self.groups[bucket] = torch.zeros(self.param.shape, dtype=self.dtype, device=t.values.device)
            self.groups[bucket].index_add_(0, t.index, t.values)
            return
        if bucket in self.groups:
            self.groups[bucket] += t.detach()
        else:  # rules return fresh tensors: keep them, no copy
            self.groups[bucket] = t.detach().to(self.dtype)


class Capture:
    """Collects one step's per-group gradients; query it after the ``with`` block."""

    def __init__(
        self,
        recorder: "GradientRecorder",
        groups: RowGroups,
        *,
        per_row: bool = False,
        verify: bool = False,
        distributed: str = "local",
        keep_pieces: bool = False,
    ):
        if distributed not in ("local", "global"):
            raise ValueError(f"distributed must be 'local' or 'global', got {distributed!r}")
        self.distributed = distributed
        self._recorder = recorder
        self.groups = groups
        self.per_row = per_row
        self.verify = verify
        self.keep_pieces = keep_pieces
        self.complement = groups.partition and not verify
        self._params: dict[int, ParamState] = {}
        self._grad_was_none = recorder._params_without_grad()
        self._row_norms_sq: list[torch.Tensor] = []
        self._finished = False

    # ---- during backward ---------------------------------------------------------------------

    def set_groups(self, groups: Mapping[str, GroupSpec], *, num_rows: int | None = None) -> None:
        """Use new row groups for the next backward (e.g. the next, smaller, micro-batch)."""
        groups = make_groups(groups, num_rows)
        if groups.names != self.groups.names:
            raise ValueError(f"set_groups must keep the group names {self.groups.names}, got {groups.names}")
        if self.complement and not groups.partition:
            raise ValueError(
                "this capture started with groups covering every row, so the last group is taken as the total "
                "minus the others; later groups must also cover every row (or start the capture with verify=True)"
            )
        self._close_row_segment()
        self.groups = groups

    def _state(self, p: torch.nn.Parameter) -> ParamState:
        st = self._params.get(id(p))
        if st is None:
            name, modules = self._recorder._describe(p)
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            st = self._params[id(p)] = ParamState(param=p, name=name, modules=modules, dtype=dtype)
        return st

    def add_total(self, p: torch.nn.Parameter, grad: torch.Tensor) -> None:
        st = self._state(p)
        if id(p) in self._grad_was_none:
            st.total_is_grad = True  # read p.grad once at the end instead of copying every piece
        elif "__total__" in st.groups:
            st.groups["__total__"] += grad.detach()
        else:  # autograd may reuse this tensor as p.grad: copy it
            st.groups["__total__"] = grad.detach().to(st.dtype, copy=True)

    def add_use(self, use: Use, rule: Rule, path: str) -> None:
        rows = use.grad_outputs[0].shape[0] if use.grad_outputs[0] is not None else None
        if rows != self.groups.num_rows:
            raise ValueError(
                f"module {path!r} sees a batch of {rows} rows along dim 0, but the groups cover {self.groups.num_rows} rows; "
                "gradlens splits gradients along dim 0 (pass num_rows= if some rows belong to no group)"
            )
        sharded = self._recorder.sharded  # FSDP2: pieces are keyed and kept sharded (gradients/fsdp.py)
        params = sharded.own_params(use.module) if sharded else dict(use.module.named_parameters(recurse=False))
        low = any(isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION for t in (use.grad_outputs[0], use.args[0] if use.args else None))
        names = self.groups.names
        explicit = names[:-1] if self.complement and rule.name not in RECOMPUTE_RULES else names
        parts = {g: rule.contribution(use, lambda x, g=g: self.groups.select(g, x)) for g in explicit}
        if self.groups.partition and rule.name in RECOMPUTE_RULES:
            probes = self._probe_from_parts(params, parts)  # groups add up to all rows: no extra pass
        else:
            probes = rule.probe(use, {n: self._recorder._probe_vectors(params[n]) for n in use.wanted})
        for local in use.wanted:
            st = self._state(params[local])
            st.rules.add(rule.name)
            st.uses += 1
            st.low_precision |= low
            for g in explicit:
                if not (self.complement and g == names[-1]):
                    st.add(g, sharded.scatter(params[local], parts[g][local]) if sharded else parts[g][local])
            value, scale = probes[local]
            st.probe_hooks = st.probe_hooks + value.detach()  # stays on device: no sync per use
            st.probe_scale = st.probe_scale + scale.detach()
        if self.per_row:
            self._add_per_row(use, rule, params)

    def _probe_from_parts(self, params, parts):
        out = {}
        for local in next(iter(parts.values())):
            vectors = self._recorder._probe_vectors(params[local])
            pairs = [probe_dense(parts[g][local], vectors) for g in parts]
            out[local] = (sum(v for v, _ in pairs), sum(s for _, s in pairs))
        return out

    # ---- per-row norms -----------------------------------------------------------------------

    def _add_per_row(self, use: Use, rule: Rule, params) -> None:
        n = self.groups.num_rows
        ghost = None
        for local in use.wanted:
            p = params[local]
            st = self._state(p)
            st.row_uses += 1
            if self._recorder._is_shared(p):
                rows = [_dense(rule.contribution(use, lambda x, i=i: x[i : i + 1])[local]) for i in range(n)]
                stacked = torch.stack(rows).to(st.dtype)
                st.row_parts = stacked if st.row_parts is None else st.row_parts + stacked
                continue
            if st.row_uses > 1:
                raise ValueError(
                    f"per-row norms: parameter {st.name!r} was used {st.row_uses} times in one backward through a module "
                    "that is not shared by name; call each module once per backward or record per-row norms separately"
                )
            if ghost is None:
                ghost = rule.per_row_sq(use)
            st.row_sq = ghost[local].to(st.dtype)

    def _close_row_segment(self) -> None:
        if not self.per_row:
            return
        total = None
        for st in self._params.values():
            part = st.row_sq if st.row_parts is None else st.row_parts.reshape(st.row_parts.shape[0], -1).pow(2).sum(1)
            if part is not None:
                part = part.to(torch.float64)
                total = part if total is None else total + part
            st.row_sq, st.row_parts, st.row_uses = None, None, 0
        if total is not None:
            self._row_norms_sq.append(total)

    # ---- after backward ----------------------------------------------------------------------

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._close_row_segment()
        states = list(self._params.values())
        for st in states:
            self._resolve_total(st)
        if self._recorder.sharded is not None:  # FSDP2: totals, probe check and norms over shards
            states = self._recorder.sharded.finish(self, states)
        else:
            if self.distributed == "global":
                from .distributed import all_reduce_states

                states = all_reduce_states(self, states)
            for st in states:
                self._split_norms(st)
        unattributed = [st.name for st in states if st.unattributed]
        if unattributed:
            warnings.warn(
                f"gradient of {unattributed} reached them through a path no module hook saw (e.g. a fused kernel reading "
                "the weight directly); they are reported as 'unattributed' in per_layer() and left out of the "
                "chosen/rejected totals",
                UnattributedGradientWarning,
                stacklevel=3,
            )

    def _resolve_total(self, st: ParamState) -> None:
        """Put this process's total gradient in ``groups['__total__']`` and run the probe check."""
        total = st.groups.pop("__total__", None)
        if st.total_is_grad and st.param.grad is not None:
            total = st.param.grad.detach() if st.param.grad.dtype == st.dtype else st.param.grad.detach().to(st.dtype)
        if total is not None:
            st.groups["__total__"] = total
            st.unattributed = not self._probe_agrees(st, total)
        elif st.uses:  # hooked uses, yet no gradient reached the parameter: never report a silent 0
            st.unattributed = True

    def _split_norms(self, st: ParamState) -> None:
        total = st.groups.pop("__total__", None)
        if total is None:
            st.groups.clear()
            return
        st.total_sq = _sq(total)
        names = self.groups.names
        if self.complement:
            known = [st.groups[g] for g in names[:-1] if g in st.groups]
            rest = total - known[0] if known else total
            for t in known[1:]:
                rest -= t
            st.groups[names[-1]] = rest
        vectors = {g: st.groups.get(g) for g in names}
        st.sq = {g: (_sq(v) if v is not None else 0.0) for g, v in vectors.items()}
        for a, b in itertools.combinations(names, 2):
            va, vb = vectors[a], vectors[b]
            st.dots[(a, b)] = _dot(va, vb) if va is not None and vb is not None else 0.0
        if self.keep_pieces:
            grad = st.param.grad
            for g, v in vectors.items():
                if v is None:
                    v = torch.zeros(st.param.shape, dtype=st.dtype, device=total.device)
                elif grad is not None and v.data_ptr() == grad.data_ptr():
                    v = v.clone()  # never hand out p.grad's own storage
                st.pieces[g] = v.view(st.param.shape)
        st.groups.clear()

    def _probe_agrees(self, st: ParamState, total: torch.Tensor) -> bool:
        if st.uses == 0:
            return not bool(total.any())  # gradient but no hooked use at all
        value, scale = probe_dense(total, self._recorder._probe_vectors(st.param))
        value, scale, hooks = float(value), float(scale), float(st.probe_hooks)
        if not (math.isfinite(value) and math.isfinite(hooks)):
            return True  # non-finite gradients are reported as such, not as unattributed
        rtol = LOW_PRECISION_RTOL if st.low_precision else PROBE_RTOL[st.dtype]
        tol = rtol * (scale + float(st.probe_scale)) + 1e-30
        return abs(value - hooks) <= tol

    # ---- queries -----------------------------------------------------------------------------

    def _attributed(self):
        self._require_finished()
        return [st for st in self._params.values() if not st.unattributed and (st.sq or st.total_sq)]

    def _require_finished(self) -> None:
        if not self._finished:
            raise RuntimeError("the capture is still open: query it after the `with rec.capture(...)` block")

    def _check_group(self, name: str) -> None:
        if name not in self.groups.names:
            raise ValueError(f"unknown group {name!r}; this capture has {list(self.groups.names)}")

    def sq_norm(self, group: str | None = None) -> float:
        if group is None:
            return sum(st.total_sq for st in self._attributed())
        self._check_group(group)
        return sum(st.sq.get(group, 0.0) for st in self._attributed())

    def norm(self, group: str | None = None) -> float:
        """L2 norm of one group's gradient, or of the whole (attributed) gradient."""
        return math.sqrt(self.sq_norm(group))

    def dot(self, a: str, b: str) -> float:
        self._check_group(a)
        self._check_group(b)
        if a == b:
            return self.sq_norm(a)
        key = self._pair_key(a, b)
        return sum(st.dots.get(key, 0.0) for st in self._attributed())

    def _pair_key(self, a: str, b: str) -> tuple[str, str]:
        names = self.groups.names
        return (a, b) if names.index(a) < names.index(b) else (b, a)

    def cosine(self, a: str, b: str) -> float:
        denom = self.norm(a) * self.norm(b)
        return self.dot(a, b) / denom if denom > 0 else float("nan")

    def ratio(self, numerator: str, denominator: str) -> float:
        """‖g_numerator‖ / ‖g_denominator‖, e.g. ρ = cap.ratio("rejected", "chosen"); inf over 0, NaN for 0/0."""
        top, bottom = self.norm(numerator), self.norm(denominator)
        if bottom > 0:
            return top / bottom
        return math.nan if top == 0 or math.isnan(top) else math.inf

    @property
    def unattributed(self) -> dict[str, float]:
        """Parameters left out of the split: name -> norm of their gradient."""
        self._require_finished()
        return {st.name: math.sqrt(st.total_sq) for st in self._params.values() if st.unattributed}

    def per_layer(self) -> pd.DataFrame:
        """One row per parameter: name, owning module(s), rule path, group sq-norms and dots."""
        self._require_finished()
        rows = []
        for st in self._params.values():
            row = {"name": st.name, "module": ",".join(st.modules), "path": "unattributed" if st.unattributed else "+".join(sorted(st.rules)) or "none"}
            for g in self.groups.names:
                row[f"sq_norm/{g}"] = float("nan") if st.unattributed else st.sq.get(g, 0.0)
            for a, b in itertools.combinations(self.groups.names, 2):
                row[f"dot/{a}/{b}"] = float("nan") if st.unattributed else st.dots.get((a, b), 0.0)
            row["sq_norm/total"] = st.total_sq
            row["uses"] = st.uses
            rows.append(row)
        return pd.DataFrame(rows)

    def layer_table(self, a: str = "chosen", b: str = "rejected") -> dict[str, dict[str, float]]:
        """Per module path (a parameter's owner): {"chosen_sq", "rejected_sq", "dot"} for the run logs."""
        self._check_group(a)
        self._check_group(b)
        key = self._pair_key(a, b)
        table: dict[str, dict[str, float]] = {}
        for st in self._attributed():
            layer = st.name.rsplit(".", 1)[0] if "." in st.name else st.name
            entry = table.setdefault(layer, {"chosen_sq": 0.0, "rejected_sq": 0.0, "dot": 0.0})
            entry["chosen_sq"] += st.sq.get(a, 0.0)
            entry["rejected_sq"] += st.sq.get(b, 0.0)
            entry["dot"] += st.dots.get(key, 0.0)
        return table

    def pieces(self, group: str) -> dict[str, torch.Tensor]:
        """Each attributed parameter's share of ``group``'s gradient: name -> tensor shaped like the parameter.

        Only with ``capture(..., keep_pieces=True)``. Tensors are float32 (float64 for
        float64 parameters), owned by the capture (``p.grad`` is never aliased). When the
        groups cover every row, the pieces of all groups add up to ``p.grad`` (to
        float32 rounding). Unattributed parameters (see ``unattributed``) have no pieces.
        Names are those of ``model.named_parameters()`` (a tied parameter appears once).
        """
        self._require_finished()
        self._check_group(group)
        if not self.keep_pieces:
            raise ValueError("pieces were not kept: use rec.capture(..., keep_pieces=True)")
        return {st.name: st.pieces[group] for st in self._attributed() if group in st.pieces}

    def per_row_norms(self) -> torch.Tensor:
        """Norm of each row's own gradient (float64), rows of all backward calls in order."""
        self._require_finished()
        if not self.per_row:
            raise ValueError("per-row norms were not requested: use rec.capture(..., per_row=True)")
        if not self._row_norms_sq:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat(self._row_norms_sq).sqrt()


def _dense(t) -> torch.Tensor:
    return t.dense() if isinstance(t, IndexedRows) else t


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ without temporaries (BLAS dot, accumulating in the buffers' dtype)."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _sq(t: torch.Tensor) -> float:
    return _dot(t, t)
