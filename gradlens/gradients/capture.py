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
live from its first use to its last). With ``accumulate=True`` (micro-batches)
or ``distributed="global"`` the pieces are kept and the norms taken when the
capture ends. ``keep_pieces=True`` keeps every group's piece whole after its
norms. Norms are float32 (float64 for float64 parameters) and stay on the
device until the capture ends: then one host sync reads the probe check and
the norms together (two when the pieces were kept: the probe check's verdicts
decide what is reduced over ranks).

The probe check: a rank-1 random probe of every use is compared with the same
probe of the real gradient, so a gradient that reached a parameter through a
path no hook saw (a fused kernel reading ``weight`` directly) is detected and the
parameter is reported as *unattributed* instead of being mis-split. When a
split layer's gradient is the only one a parameter received, autograd hands
that very tensor to the parameter hook, and no probe is needed.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Optional, Protocol

import pandas as pd
import torch

from .distributed import average_over_ranks
from .groups import GroupSpec, RowGroups, make_groups
from .norms import Layout, fold_dense_use, stats_pass, take_norms
from .params import ParamIndex
from .rules import IndexedRows, Rule, Use, probe_dense
from .state import LOW_PRECISION, ParamState, PendingUses, Probe, pair_names, probe_agrees, probe_rtol, read_norms, set_norms


class UnattributedGradientWarning(UserWarning):
    """Some parameter gradient arrived through a path no hook saw; it is left out of the split."""


class Sharding(Protocol):
    """What a capture needs from sharded parameters (FSDP2: ``fsdp.ShardedParams``)."""

    def own_params(self, module: torch.nn.Module) -> dict[str, torch.nn.Parameter]: ...
    def params(self) -> list[torch.nn.Parameter]: ...
    def scatter(self, p: torch.nn.Parameter, piece) -> torch.Tensor: ...
    def set_totals(self, states: list[ParamState]) -> None: ...
    def local_vectors(self, p: torch.nn.Parameter, index: ParamIndex) -> tuple[torch.Tensor, ...]: ...
    def reduce(self, states: list[ParamState], probes: list[Probe], names: tuple[str, ...]) -> None: ...


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
        sharded: Optional[Sharding] = None,
        pending: Optional[dict[int, PendingUses]] = None,
    ):
        if distributed not in ("local", "global"):
            raise ValueError(f"distributed must be 'local' or 'global', got {distributed!r}")
        self.distributed = distributed
        self.index = index  # the recorder's knowledge of the model's parameters (names, probes)
        self.sharded = sharded  # FSDP2: pieces are kept sharded (gradients/fsdp.py)
        self.pending = pending if pending is not None else {}  # tied parameters' uses still to come (recorder)
        self.groups = groups
        self.per_row = per_row
        self.verify = verify
        self.accumulate = accumulate
        self.keep_pieces = keep_pieces
        # With groups covering every row, the last group is the total minus the others (never stored).
        self.complement = groups.partition and not verify
        self.layout = Layout(groups.names, self.complement, keep_pieces)
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
        explicit, full = self._pieces_of(use, rule, totals)
        if full is not None:  # in each parameter's own dtype: what autograd hands to its hook
            full = {local: t.to(params[local].dtype) if isinstance(t, torch.Tensor) else t for local, t in full.items()}
        probes = None if full is not None else rule.probe(use, {n: self.index.probe_vectors(params[n]) for n in use.wanted})
        for local in use.wanted:
            st = self._state(params[local])
            st.rules.add(rule.name)
            st.uses += 1
            st.low_precision |= low
            rows = self._rows_still_to_come(params[local], rule)
            if rows is not None and full is not None and self._can_fold(st):
                # a head tied to an embedding: stats outside the embedding's rows now, no buffer kept
                pieces = {g: explicit[g][local] for g in self.layout.stored}
                vectors = self.index.probe_vectors(params[local])
                st.add_probe(fold_dense_use(st, pieces, full[local], rows, self.layout, vectors), real=False)
                continue
            for g in self.layout.stored:
                piece = explicit[g][local]
                st.add(g, sharded.scatter(params[local], _widen(piece, st.dtype)) if sharded else piece)
            if full is not None and sharded:  # no parameter hook fires under FSDP2: probe now
                st.add_probe(Probe(*probe_dense(full[local], self.index.probe_vectors(params[local]))), real=False)
            elif full is not None:
                st.split_outputs.append(full[local])  # probed in add_total only if needed
            else:
                st.observed_uses += 1
                st.add_probe(Probe(*probes[local]), real=False)  # stays on device: no sync per use
        if self.per_row:
            self._add_per_row(use, rule, params)
        return full if totals else None

    def _rows_still_to_come(self, p: torch.nn.Parameter, rule: Rule) -> Optional[torch.Tensor]:
        """Count this use off the parameter's pending forward uses; for a dense use after which
        only sparse uses remain, the rows those will touch (else None)."""
        pending = self.pending.get(id(p))
        if pending is None:
            return None
        if rule.sparse_rows is not None:
            if pending.rows:
                pending.rows.pop(0)
            return None
        pending.dense = max(0, pending.dense - 1)
        if pending.dense or not pending.rows:
            return None
        return torch.cat([r.reshape(-1) for r in pending.rows])

    def _can_fold(self, st: ParamState) -> bool:
        """One backward whose norms are streamed, no piece kept whole, nothing added yet."""
        return (
            self.streaming and self.sharded is None and not self.keep_pieces and not self.per_row
            and st.param.dim() == 2 and not st.groups and not st.sparse and st.folded_rows is None and st.backwards == 0
        )

    def _pieces_of(self, use: Use, rule: Rule, totals: bool) -> tuple[dict, Optional[dict]]:
        """The pieces of the groups this use computes explicitly, and the use's full gradient
        when it comes for free or is needed (``totals``, a split layer); else None (probed).

        - a split layer whose last group is the remainder: the stored groups, then the full
          gradient as their sum plus the last group in one fused product (no temporary);
        - a split layer otherwise: every group, the full gradient as their sum (or, when
          the groups leave rows out, one more product over all rows);
        - a rule that re-runs the module's forward costs per group, not per row: every
          group, and the full gradient as their sum when they cover every row;
        - any other observed layer: only the stored groups; its probe comes from the rule.
        """
        names, stored = self.groups.names, self.layout.stored
        every_row = self.groups.partition
        pieces = lambda which: {g: rule.contribution(use, self._rows(g)) for g in which}  # noqa: E731
        if totals and self.complement and rule.add_contribution is not None:
            explicit = pieces(stored)
            base = explicit[stored[0]] if len(stored) == 1 else _sum_parts(explicit, stored)
            return explicit, rule.add_contribution(use, self._rows(names[-1]), base)
        if totals:
            explicit = pieces(names)
            return explicit, _sum_parts(explicit, names) if every_row else rule.contribution(use, lambda x: x)
        if rule.reruns_forward:
            explicit = pieces(names)
            return explicit, _sum_parts(explicit, names) if every_row else None
        return pieces(stored), None

    def _rows(self, group: str):
        return lambda x: self.groups.select(group, x)

    def add_total(self, p: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """``p``'s real gradient of one backward, after all of that backward's uses of ``p``."""
        self._backward_seen = True
        st = self._state(p)
        st.backwards += 1
        if self.streaming and st.backwards > 1:
            raise RuntimeError(f"parameter {st.name!r}: {_ACCUMULATE_MESSAGE}")
        probed = self._to_probe(st, grad)
        vectors = self.index.probe_vectors(p) if probed else None
        if self.streaming:  # norms and probes in one pass over the gradient
            self._add_probes(st, take_norms(st, grad.detach(), self.layout, probed, vectors))
            return
        if probed:
            self._add_probes(st, stats_pass(grad.detach(), [], complement=False, probed=probed, vectors=vectors).probes)
        if id(p) not in self._grad_was_none:
            st.total = grad.detach().to(st.dtype, copy=True) if st.total is None else st.total.add_(grad.detach())
        else:
            st.total_is_grad = True  # read p.grad once at the end instead of copying every piece

    def _to_probe(self, st: ParamState, grad: torch.Tensor) -> list[torch.Tensor]:
        """Tensors whose probes this backward still needs: none when the real gradient is, by
        identity, the one gradient a split layer returned (autograd hands that very tensor on);
        else the split layers' gradients, then the real gradient (last)."""
        outputs, st.split_outputs = st.split_outputs, []
        observed, st.observed_uses = st.observed_uses, 0
        if not observed and len(outputs) == 1 and _same_tensor(outputs[0], grad):
            return []
        return outputs + [grad.detach()]

    def _add_probes(self, st: ParamState, probes: list[Probe]) -> None:
        for i, probe in enumerate(probes):
            st.add_probe(probe, real=i == len(probes) - 1)

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

    # ---- after backward ----------------------------------------------------------------------

    def finish(self) -> None:
        """End the capture: totals, the probe check and the norms of every parameter.

        Two host syncs in all, whatever the model's size: one for the probe check's
        verdicts (which decide what is attributed) and one for the norms. Under FSDP2
        and DDP the collectives come in between, on the device.
        """
        if self._finished:
            return
        self._finished = True
        self._close_row_segment()
        if self.sharded is not None:
            states = self._finish_sharded()
        else:
            states = self._finish_unsharded()
        unattributed = [st.name for st in states if st.unattributed]
        if unattributed:
            warnings.warn(
                f"gradient of {unattributed} reached them through a path no module hook saw (e.g. a fused kernel reading "
                "the weight directly); they are reported as 'unattributed' in per_layer() and left out of the "
                "chosen/rejected totals",
                UnattributedGradientWarning,
                stacklevel=3,
            )

    def _finish_unsharded(self) -> list[ParamState]:
        states = list(self._params.values())
        if self.streaming:  # norms were taken in add_total: one sync reads probes and norms
            self._read_streamed(states)
            return states
        self._decide_attribution(states)
        if self.distributed == "global":  # every parameter, the same order on every rank
            states = [self._state(p) for p in self.index.trainable()]
            average_over_ranks(states, self.layout)
        for st in states:
            total = st.param.grad.detach() if st.total_is_grad and st.param.grad is not None else st.total
            st.total = None
            if total is not None:
                take_norms(st, total, self.layout)
        read_norms(states, self.groups.names)
        return states

    def _read_streamed(self, states: list[ParamState]) -> None:
        """The probe sums and the norms of every parameter, moved to the host in one sync."""
        probed = [st for st in states if st.probe is not None]
        normed = [st for st in states if st.stats is not None]
        parts = [st.probe for st in probed] + [st.stats for st in normed]
        if parts:
            device = parts[0].device
            values = torch.cat([t.to(device, torch.float64).reshape(-1) for t in parts]).tolist()
            for st in probed:
                st.probe, values = torch.tensor(values[:4], dtype=torch.float64), values[4:]
            width = 1 + len(self.groups.names) + len(pair_names(self.groups.names))
            for st in normed:
                set_norms(st, values[:width], self.groups.names)
                st.stats, values = None, values[width:]
        self._decide_attribution(states)

    def _finish_sharded(self) -> list[ParamState]:
        sharded = self.sharded
        states = [self._state(p) for p in sharded.params()]  # every parameter, the same order on every rank
        sharded.set_totals(states)
        probes = []
        for st in states:  # norms and the total's probe, on this rank's shard, in one pass
            total, st.total = st.total, None
            probes += take_norms(st, total, self.layout, [total], sharded.local_vectors(st.param, self.index))
        sharded.reduce(states, probes, self.groups.names)  # one all-reduce; then the probe check
        return states

    def _decide_attribution(self, states: list[ParamState]) -> None:
        """Compare every parameter's probe sums (one host sync for all of them)."""
        probed = [st for st in states if st.probe is not None]
        if probed:
            device = probed[0].probe.device
            values = torch.stack([st.probe.to(device, torch.float64) for st in probed]).tolist()
            for st, (hooks, hooks_scale, real, real_scale) in zip(probed, values):
                st.unattributed = not probe_agrees(probe_rtol(st), Probe(hooks, hooks_scale), Probe(real, real_scale))
        for st in states:
            if st.uses == 0 and st.backwards:  # a gradient but no hooked use at all
                st.unattributed = True
            elif st.uses and not st.backwards and not st.total_is_grad:
                st.unattributed = True  # hooked uses, yet no gradient reached the parameter: never report a silent 0

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
            for a, b in pair_names(self.groups.names):
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
    """The groups' pieces added in group order, in float32 at least: the full gradient of a use."""
    out = {}
    for local in parts[names[0]]:
        first = _dense(parts[names[0]][local])
        total = first.to(torch.promote_types(first.dtype, torch.float32), copy=True)
        for g in names[1:]:
            piece = parts[g][local]
            if isinstance(piece, IndexedRows):
                total.index_add_(0, piece.index, piece.values.to(total.dtype))
            else:
                total += piece
        out[local] = total
    return out


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _widen(piece, dtype: torch.dtype):
    """A piece in the accumulation dtype (pieces of bf16 products are bf16), sparse or dense."""
    if isinstance(piece, IndexedRows):
        return piece if piece.values.dtype == dtype else IndexedRows(piece.index, piece.values.to(dtype), piece.shape)
    return piece.to(dtype)


def _dense(t) -> torch.Tensor:
    return t.dense() if isinstance(t, IndexedRows) else t
