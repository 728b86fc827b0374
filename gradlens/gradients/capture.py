"""One capture: the per-group gradient pieces of one or more backward passes, and their norms.

During backward the recorder hands every module use to ``Capture.add_use``,
which asks the layer's rule for each group's piece and adds it up per parameter
(tied parameters share one sum, so every use counts). Each parameter's real
gradient arrives once per backward through a tensor hook (``add_total``), after
all of that backward's uses of the parameter.

When the groups cover every row exactly once, the last group is never stored:
it is the real gradient minus the other groups.

By default (one backward per capture) a parameter's norms and dot products are
taken in ``add_total``, the moment its gradient is complete, and its pieces are
freed: no gradient-sized buffer outlives its layer (a tied parameter's pieces
live from its first use to its last). With ``accumulate=True`` (micro-batches),
``distributed="global"`` or ``keep_pieces=True`` the pieces are kept and the
norms taken when the capture ends. Norms are float32 (float64 for float64
parameters) and stay on the device; the capture syncs with the host once, at
its end.

The probe check: a rank-1 random probe of every use is compared with the same
probe of the real gradient, so a gradient that reached a parameter through a
path no hook saw (a fused kernel reading ``weight`` directly) is detected and the
parameter is reported as *unattributed* instead of being mis-split. When a
split layer's gradient is the only one a parameter received, autograd hands
that very tensor to the parameter hook, and no probe is needed.
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
from .params import ParamIndex
from .rules import IndexedRows, Rule, Use, probe_dense

if TYPE_CHECKING:
    from .fsdp import ShardedParams


class UnattributedGradientWarning(UserWarning):
    """Some parameter gradient arrived through a path no hook saw; it is left out of the split."""


# Rounding tolerance of the probe check, relative to the magnitudes summed. When the
# model itself computed in bf16/fp16 (autocast), its gradient carries that rounding.
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}
LOW_PRECISION_RTOL = 3e-2
LOW_PRECISION = (torch.bfloat16, torch.float16)
CHUNK = 1 << 20  # elements per step of the finishing pass: bounds its temporaries


@dataclass
class ParamState:
    param: torch.nn.Parameter
    name: str
    modules: list[str]
    dtype: torch.dtype
    groups: dict[str, torch.Tensor] = field(default_factory=dict)  # explicitly computed groups' pieces
    total: Optional[torch.Tensor] = None  # kept totals (accumulate/global), unless p.grad is the total
    total_is_grad: bool = False  # p.grad was None when the capture began: at the end it *is* the total
    backwards: int = 0
    split_outputs: list = field(default_factory=list)  # this backward's split-layer gradients (references)
    observed_uses: int = 0  # this backward's uses probed by their rule
    probe: Optional[torch.Tensor] = None  # Σ [hooks value, hooks scale, real value, real scale]
    rules: set[str] = field(default_factory=set)
    uses: int = 0
    low_precision: bool = False  # some use ran in bf16/fp16
    row_uses: int = 0  # uses in the current per-row segment
    row_sq: Optional[torch.Tensor] = None  # ghost per-row squared norms (single use)
    row_parts: Optional[torch.Tensor] = None  # materialised per-row gradients (tied / reused)
    stats: Optional[torch.Tensor] = None  # [total_sq, sq per group, dot per pair], on the device
    # results
    sq: dict[str, float] = field(default_factory=dict)
    dots: dict[tuple[str, str], float] = field(default_factory=dict)
    total_sq: float = 0.0
    unattributed: bool = False
    pieces: dict[str, torch.Tensor] = field(default_factory=dict)  # kept only with keep_pieces=True

    def add(self, bucket: str, t) -> None:
        if isinstance(t, IndexedRows):  # sparse rows (embeddings): add in place, no dense temporary
            if bucket in self.groups:
                self.groups[bucket].index_add_(0, t.index, t.values)
            else:
                self.groups[bucket] = t.dense().to(self.dtype)
            return
        if bucket in self.groups:
            self.groups[bucket] += t.detach()
        else:  # rules return fresh tensors: keep them, no copy
            self.groups[bucket] = t.detach().to(self.dtype)

    def add_probe(self, value, scale, real: bool) -> None:
        zero = torch.zeros((), dtype=value.dtype, device=value.device)
        v = torch.stack([zero, zero, value.detach(), scale.detach()] if real else [value.detach(), scale.detach(), zero, zero])
        self.probe = v if self.probe is None else self.probe + v.to(self.probe.device)


class Capture:
    """Collects one step's per-group gradients; query it after the ``with`` block."""

    def __init__(
        self,
        index: ParamIndex,
        groups: RowGroups,
        *,
        per_row: bool = False,
        verify: bool = False,
        accumulate: bool = False,
        distributed: str = "local",
        keep_pieces: bool = False,
        sharded: Optional["ShardedParams"] = None,
    ):
        if distributed not in ("local", "global"):
            raise ValueError(f"distributed must be 'local' or 'global', got {distributed!r}")
        self.distributed = distributed
        self.index = index  # the recorder's knowledge of the model's parameters (names, probes)
        self.sharded = sharded  # FSDP2: pieces are keyed and kept sharded (gradients/fsdp.py)
        self.groups = groups
        self.per_row = per_row
        self.verify = verify
        self.accumulate = accumulate
        self.keep_pieces = keep_pieces
        self.complement = groups.partition and not verify
        # Norms in add_total, unless the pieces must outlive this backward.
        self.streaming = not accumulate and distributed == "local"
        self._params: dict[int, ParamState] = {}
        self._grad_was_none = set() if self.streaming else index.without_grad()
        self._row_norms_sq: list[torch.Tensor] = []
        self._backward_seen = False
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
        if self._backward_seen and self.streaming:
            raise ValueError(_ACCUMULATE_MESSAGE)
        self._close_row_segment()
        self.groups = groups

    def _state(self, p: torch.nn.Parameter) -> ParamState:
        st = self._params.get(id(p))
        if st is None:
            name, modules = self.index.describe(p)
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            st = self._params[id(p)] = ParamState(param=p, name=name, modules=modules, dtype=dtype)
        return st

    def add_use(self, use: Use, rule: Rule, path: str, *, totals: bool = False) -> Optional[dict[str, torch.Tensor]]:
        """Add one use's group pieces. ``totals=True`` (a split layer): also return the use's
        full parameter gradients, computed as the sum of the groups' pieces."""
        rows = use.grad_outputs[0].shape[0] if use.grad_outputs[0] is not None else None
        if rows != self.groups.num_rows:
            raise ValueError(
                f"module {path!r} sees a batch of {rows} rows along dim 0, but the groups cover {self.groups.num_rows} rows; "
                "gradlens splits gradients along dim 0 (pass num_rows= if some rows belong to no group)"
            )
        sharded = self.sharded
        params = sharded.own_params(use.module) if sharded else dict(use.module.named_parameters(recurse=False))
        low = bool(use.autocast) or any(
            isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION for t in (use.grad_outputs[0], use.args[0] if use.args else None)
        )  # the forward ran under autocast, or on bf16/fp16 tensors
        names = self.groups.names
        stored = names[:-1] if self.complement else names
        select = {g: (lambda x, g=g: self.groups.select(g, x)) for g in names}
        fused = totals and self.complement and rule.add_contribution is not None
        computed = stored if fused or not (rule.recompute or totals or not self.complement) else names
        parts = {g: rule.contribution(use, select[g]) for g in computed}
        full = None
        if fused:  # full = (stored groups) + last group, one fused product: no temporary for the last group
            base = parts[stored[0]] if len(stored) == 1 else _sum_parts(parts, stored)
            full = rule.add_contribution(use, select[names[-1]], base)
        elif totals:
            full = _sum_parts(parts, names) if self.groups.partition else rule.contribution(use, lambda x: x)
        elif rule.recompute and self.groups.partition:
            full = _sum_parts(parts, names)  # groups add up to all rows: the probe needs no extra pass
        probes = None if full is not None else rule.probe(use, {n: self.index.probe_vectors(params[n]) for n in use.wanted})
        for local in use.wanted:
            st = self._state(params[local])
            st.rules.add(rule.name)
            st.uses += 1
            st.low_precision |= low
            for g in stored:
                st.add(g, sharded.scatter(params[local], parts[g][local]) if sharded else parts[g][local])
            if full is not None and sharded:  # no parameter hook fires under FSDP2: probe now
                st.add_probe(*probe_dense(full[local], self.index.probe_vectors(params[local])), real=False)
            elif full is not None:
                st.split_outputs.append(full[local])  # probed in add_total only if needed
            else:
                st.observed_uses += 1
                st.add_probe(*probes[local], real=False)  # stays on device: no sync per use
        if self.per_row:
            self._add_per_row(use, rule, params)
        return full if totals else None

    def add_total(self, p: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """``p``'s real gradient of one backward, after all of that backward's uses of ``p``."""
        self._backward_seen = True
        st = self._state(p)
        st.backwards += 1
        if self.streaming and st.backwards > 1:
            raise RuntimeError(f"parameter {st.name!r}: {_ACCUMULATE_MESSAGE}")
        probe = self._to_probe(st, grad)
        if self.streaming:  # norms and probes in one pass over the gradient
            self._add_probes(st, probe, self._take_norms(st, grad.detach(), probe))
            return
        if probe:
            self._add_probes(st, probe, _stats_pass(grad.detach(), [], False, probe, self.index.probe_vectors(p))[1])
        if id(p) not in self._grad_was_none:
            st.total = grad.detach().to(st.dtype, copy=True) if st.total is None else st.total.add_(grad.detach())
        else:
            st.total_is_grad = True  # read p.grad once at the end instead of copying every piece

    def _to_probe(self, st: ParamState, grad: torch.Tensor) -> list[torch.Tensor]:
        """Tensors whose probes this backward still needs: none when the real gradient is, by
        identity, the one gradient a split layer returned (autograd hands that very tensor on);
        else the split layers' gradients, then the real gradient."""
        outputs, st.split_outputs = st.split_outputs, []
        observed, st.observed_uses = st.observed_uses, 0
        if not observed and len(outputs) == 1 and _same_tensor(outputs[0], grad):
            return []
        return outputs + [grad.detach()]

    def _add_probes(self, st: ParamState, tensors: list[torch.Tensor], results: list) -> None:
        for i, (value, scale) in enumerate(results):
            st.add_probe(value, scale, real=i == len(tensors) - 1)

    # ---- per-row norms -----------------------------------------------------------------------

    def _add_per_row(self, use: Use, rule: Rule, params) -> None:
        n = self.groups.num_rows
        ghost = None
        for local in use.wanted:
            p = params[local]
            st = self._state(p)
            st.row_uses += 1
            if self.index.is_shared(p):
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

    # ---- norms -------------------------------------------------------------------------------

    def _take_norms(self, st: ParamState, total: torch.Tensor, probe: list[torch.Tensor] = ()) -> list:
        """Squared norms and dots of every group (and the total) of one parameter, on the device,
        and the probes of ``probe``; frees its pieces (or keeps them, with ``keep_pieces``)."""
        names = self.groups.names
        explicit = [st.groups.pop(g, None) for g in (names[:-1] if self.complement else names)]
        st.groups.clear()
        vectors = self.index.probe_vectors(st.param) if probe else None
        st.stats, probes = _stats_pass(total, explicit, self.complement, list(probe), vectors)
        if self.keep_pieces:
            zero = lambda: torch.zeros(st.param.shape, dtype=st.dtype, device=total.device)  # noqa: E731
            pieces = [zero() if t is None else t for t in explicit]
            if self.complement:
                last = total.to(st.dtype, copy=True)
                for t in pieces:
                    last -= t
                pieces.append(last)
            st.pieces = dict(zip(names, (t.view(st.param.shape) for t in pieces)))
        return probes

    # ---- after backward ----------------------------------------------------------------------

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._close_row_segment()
        states = list(self._params.values())
        if self.sharded is not None:  # FSDP2: totals, probe check and norms over shards
            states = self.sharded.finish(self, states)
        else:
            states = self._finish_unsharded(states)
        unattributed = [st.name for st in states if st.unattributed]
        if unattributed:
            warnings.warn(
                f"gradient of {unattributed} reached them through a path no module hook saw (e.g. a fused kernel reading "
                "the weight directly); they are reported as 'unattributed' in per_layer() and left out of the "
                "chosen/rejected totals",
                UnattributedGradientWarning,
                stacklevel=3,
            )

    def _finish_unsharded(self, states: list[ParamState]) -> list[ParamState]:
        self._decide_attribution(states)
        if not self.streaming:
            if self.distributed == "global":
                from .distributed import all_reduce_states

                states = all_reduce_states(self, states)
            for st in states:
                total = st.param.grad.detach() if st.total_is_grad and st.param.grad is not None else st.total
                st.total = None
                if total is not None:
                    self._take_norms(st, total)
        self._read_norms(states)
        return states

    def _decide_attribution(self, states: list[ParamState]) -> None:
        """Compare every parameter's probe sums (one host sync for all of them)."""
        probed = [st for st in states if st.probe is not None]
        if probed:
            device = probed[0].probe.device
            values = torch.stack([st.probe.to(device, torch.float64) for st in probed]).tolist()
            for st, (hooks, hooks_scale, real, real_scale) in zip(probed, values):
                st.unattributed = not _probe_agrees(st, hooks, hooks_scale, real, real_scale)
        for st in states:
            if st.uses == 0 and st.backwards:  # a gradient but no hooked use at all
                st.unattributed = True
            elif st.uses and not st.backwards and not st.total_is_grad:
                st.unattributed = True  # hooked uses, yet no gradient reached the parameter: never report a silent 0

    def _read_norms(self, states: list[ParamState]) -> None:
        """Move every parameter's norms to the host at once."""
        done = [st for st in states if st.stats is not None]
        if not done:
            return
        device = done[0].stats.device
        names = self.groups.names
        pairs = list(itertools.combinations(names, 2))
        for st, row in zip(done, torch.stack([st.stats.to(device, torch.float64) for st in done]).tolist()):
            st.total_sq = row[0]
            st.sq = dict(zip(names, row[1 : 1 + len(names)]))
            st.dots = dict(zip(pairs, row[1 + len(names) :]))
            st.stats = None

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
        """Per module path (a parameter's owner): ``{f"{a}_sq", f"{b}_sq", "dot"}``, e.g.
        ``{"chosen_sq", "rejected_sq", "dot"}`` for the run logs' layers table."""
        self._check_group(a)
        self._check_group(b)
        key = self._pair_key(a, b)
        table: dict[str, dict[str, float]] = {}
        for st in self._attributed():
            layer = st.name.rsplit(".", 1)[0] if "." in st.name else st.name
            entry = table.setdefault(layer, {f"{a}_sq": 0.0, f"{b}_sq": 0.0, "dot": 0.0})
            entry[f"{a}_sq"] += st.sq.get(a, 0.0)
            entry[f"{b}_sq"] += st.sq.get(b, 0.0)
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


_ACCUMULATE_MESSAGE = (
    "a second backward pass in one capture. A capture takes each parameter's norms as soon as its gradient "
    "is complete; to add up micro-batches, open it with rec.capture(..., accumulate=True)"
)


def _sum_parts(parts: dict[str, dict[str, torch.Tensor]], names) -> dict[str, torch.Tensor]:
    """The groups' pieces added in group order: the full gradient of a use."""
    out = {}
    for local in parts[names[0]]:
        total = _dense(parts[names[0]][local]).clone()
        for g in names[1:]:
            piece = parts[g][local]
            if isinstance(piece, IndexedRows):
                total.index_add_(0, piece.index, piece.values)
            else:
                total += piece
        out[local] = total
    return out


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _stats_pass(total: torch.Tensor, explicit: list, complement: bool, probe: list, vectors: tuple) -> tuple:
    """One pass over a parameter's gradient, in row blocks that stay in cache:

    - stats: [‖total‖², the groups' squared norms, their dots (pairs i < j)], where the
      groups are the ``explicit`` pieces (None: zero) and, with ``complement``, the total
      minus them;
    - the rank-1 probe (value, scale) of every tensor in ``probe``. The scale is
      ‖t‖·‖v‖·‖z‖/√(numel): for random Gaussian v, z, rounding errors E in t move the probe
      by about ‖E‖, so it bounds them with a wide margin, and a missing gradient M is
      caught once ‖M‖ exceeds the rounding tolerance times ‖t‖.

    No gradient-sized temporary is made. Accumulates in the dtype of the pieces.
    """
    dtype = next((e.dtype for e in explicit if e is not None), torch.float64 if total.dtype == torch.float64 else torch.float32)
    rows = total.shape[0] if total.dim() >= 1 else 1
    cols = total.numel() // max(rows, 1)
    view = lambda t: _dense(t).reshape(rows, cols)  # noqa: E731
    t2 = view(total)
    flats = [None if e is None else view(e) for e in explicit]
    probed = [view(p) for p in probe]
    v, z = (None, None) if not probe else (vectors[0], vectors[1]) if len(vectors) == 2 else (None, vectors[0])
    k = len(flats) + complement
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    acc = torch.zeros(1 + k + len(pairs), dtype=dtype, device=total.device)
    found = torch.zeros(len(probed), 2, dtype=dtype, device=total.device)  # (value, ‖t‖²)
    step = max(1, CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        tc = t2[r0 : r0 + step].to(dtype)
        blocks = [torch.zeros_like(tc) if f is None else f[r0 : r0 + step] for f in flats]
        if complement:
            rest = tc - blocks[0] if blocks else tc.clone()
            for b in blocks[1:]:
                rest -= b
            blocks.append(rest)
        flat = [b.reshape(-1) for b in blocks]
        values = [tc.reshape(-1) @ tc.reshape(-1)] + [b @ b for b in flat] + [flat[i] @ flat[j] for i, j in pairs]
        acc += torch.stack(values)
        for n, p in enumerate(probed):
            block = p[r0 : r0 + step].to(dtype)
            value = block.reshape(-1) @ z[r0 : r0 + step] if v is None else v[r0 : r0 + step] @ block @ z
            flat = block.reshape(-1)
            found[n] += torch.stack([value, flat @ flat])
    if not probe:
        return acc, []
    size = (v.norm() if v is not None else 1.0) * z.norm() / max(total.numel(), 1) ** 0.5
    return acc, [(found[n, 0], found[n, 1].sqrt() * size) for n in range(len(probed))]


def _probe_agrees(st: ParamState, hooks: float, hooks_scale: float, real: float, real_scale: float) -> bool:
    if not (math.isfinite(real) and math.isfinite(hooks)):
        return True  # non-finite gradients are reported as such, not as unattributed
    rtol = LOW_PRECISION_RTOL if st.low_precision else PROBE_RTOL[st.dtype]
    return abs(real - hooks) <= rtol * (real_scale + hooks_scale) + 1e-30


def _dense(t) -> torch.Tensor:
    return t.dense() if isinstance(t, IndexedRows) else t
