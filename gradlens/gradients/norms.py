"""One pass over a parameter's gradient: the squared norms and dots of its group pieces, and its probes.

A capture stores the pieces of the explicitly computed groups; when the groups
cover every row (``Layout.complement``), the last group is never stored: it is
the total minus the others, formed block by block here and never as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .rules import IndexedRows
from .state import CHUNK, ParamState, Probe, pair_names


@dataclass(frozen=True)
class Layout:
    """How a capture keeps its groups' pieces."""

    names: tuple[str, ...]
    complement: bool  # the last group is the total minus the others (not stored)
    keep_pieces: bool = False  # keep every group's piece after the norms (``Capture.pieces``)

    @property
    def stored(self) -> tuple[str, ...]:
        return self.names[:-1] if self.complement else self.names


@dataclass
class NormPass:
    stats: torch.Tensor  # [‖total‖², ‖group‖² per group, ⟨a, b⟩ per pair], on the device
    probes: list[Probe]  # one per probed tensor, in order


def take_norms(st: ParamState, total: torch.Tensor, layout: Layout, probed: Sequence[torch.Tensor] = (), vectors=None) -> list[Probe]:
    """Set ``st.stats`` from ``total`` and the stored pieces, and return the probes of ``probed``;
    frees the pieces (or keeps them whole in ``st.pieces``, with ``layout.keep_pieces``)."""
    if st.folded_rows is not None:
        return _take_folded_norms(st, total, layout, probed, vectors)
    if st.sparse and not st.groups and not layout.keep_pieces:
        return _take_sparse_norms(st, total, layout, probed, vectors)
    st.densify()
    explicit = [st.groups.pop(g, None) for g in layout.stored]
    st.groups.clear()
    result = stats_pass(total, explicit, complement=layout.complement, probed=probed, vectors=vectors)
    st.stats = result.stats
    if layout.keep_pieces:
        pieces = [torch.zeros(st.param.shape, dtype=st.dtype, device=total.device) if t is None else t for t in explicit]
        if layout.complement:
            last = total.to(st.dtype, copy=True)
            for t in pieces:
                last -= t
            pieces.append(last)
        st.pieces = dict(zip(layout.names, (t.view(st.param.shape) for t in pieces)))
    return result.probes


def fold_dense_use(
    st: ParamState, pieces: dict[str, torch.Tensor], full: torch.Tensor, rows: torch.Tensor, layout: Layout, vectors: tuple
) -> Probe:
    """A tied parameter's dense use (a head) whose remaining uses in this backward only touch
    ``rows`` (an embedding's tokens): take its stats outside those rows now, and keep its pieces
    on them only, instead of a parameter-sized buffer until the embedding's use.

    Outside the rows nothing else will be added, so the groups there are final: the stored
    pieces, and the last group as this use's full gradient minus them. Returns the probe of
    the use's full gradient, taken in the same pass.
    """
    rows = torch.unique(rows.to(full.device))
    width = full[0].numel()
    keep = torch.ones(full.shape[0], dtype=st.dtype, device=full.device)
    keep[rows] = 0
    explicit = [pieces.get(g) for g in layout.stored]
    result = stats_pass(full, explicit, complement=layout.complement, probed=[full], vectors=vectors, keep_rows=keep)
    st.folded_stats = result.stats
    st.folded_rows = rows
    st.folded = {g: t.reshape(full.shape[0], width)[rows].to(st.dtype) for g, t in zip(layout.stored, explicit) if t is not None}
    return result.probes[0]


def _take_folded_norms(st: ParamState, total: torch.Tensor, layout: Layout, probed, vectors) -> list[Probe]:
    """``take_norms`` after ``fold_dense_use``: the rows R formed exactly from the kept pieces,
    the sparse uses' rows and the real gradient; the rest was taken at the dense use."""
    rows, width = st.folded_rows, total[0].numel()
    explicit = []
    for g in layout.stored:
        block = st.folded.get(g)
        block = torch.zeros(rows.numel(), width, dtype=st.dtype, device=total.device) if block is None else block
        for part in st.sparse.pop(g, []):
            where = torch.searchsorted(rows, part.index)
            if not bool((rows[where.clamp_max(rows.numel() - 1)] == part.index).all()):
                raise RuntimeError(f"parameter {st.name!r}: a sparse use touched rows its forward did not announce")
            block.index_add_(0, where, part.values.reshape(-1, width).to(st.dtype))
        explicit.append(block)
    st.sparse.clear()
    st.groups.clear()
    on_rows = stats_pass(total.reshape(total.shape[0], width)[rows], explicit, complement=layout.complement)
    whole = stats_pass(total, [], complement=False, probed=probed, vectors=vectors)
    stats = st.folded_stats + on_rows.stats
    stats[0] = whole.stats[0]
    st.stats = stats
    st.folded_rows, st.folded, st.folded_stats = None, {}, None
    return whole.probes


def _take_sparse_norms(st: ParamState, total: torch.Tensor, layout: Layout, probed, vectors) -> list[Probe]:
    """``take_norms`` for pieces that are only sparse rows (an embedding's): over the rows the
    batch touched, R, plus one pass over the whole total for ‖total‖² and the probes.

    Outside R every stored piece is 0, so there the last group (the total minus the others)
    is the total itself: its squared norm gains ‖total‖² − ‖total_R‖², and no dot changes.
    No vocabulary-sized buffer is made for the pieces.
    """
    parts = {g: st.sparse.pop(g, []) for g in layout.stored}
    st.sparse.clear()
    index = torch.cat([p.index for ps in parts.values() for p in ps])
    rows, where = torch.unique(index, return_inverse=True)  # R, and each piece row's place in it
    width = total[0].numel() if total.dim() else 1
    explicit, offset = [], 0
    for g in layout.stored:
        if not parts[g]:
            explicit.append(None)
            continue
        block = torch.zeros(rows.numel(), width, dtype=st.dtype, device=total.device)
        for p in parts[g]:
            n = p.index.numel()
            block.index_add_(0, where[offset : offset + n], p.values.reshape(n, width).to(st.dtype))
            offset += n
        explicit.append(block)
    on_rows = stats_pass(total.reshape(total.shape[0], width)[rows], explicit, complement=layout.complement)
    whole = stats_pass(total, [], complement=False, probed=probed, vectors=vectors)
    stats = on_rows.stats.clone()
    stats[0] = whole.stats[0]
    if layout.complement:  # the last group's square, index k: add what lies outside R
        stats[len(layout.names)] += whole.stats[0] - on_rows.stats[0]
    st.stats = stats
    return whole.probes


def stats_pass(
    total: torch.Tensor,
    explicit: list[Optional[torch.Tensor]],
    *,
    complement: bool,
    probed: Sequence[torch.Tensor] = (),
    vectors: Optional[tuple[torch.Tensor, ...]] = None,
    keep_rows: Optional[torch.Tensor] = None,
) -> NormPass:
    """One pass over a parameter's gradient, in row blocks that stay in cache:

    - stats: [‖total‖², the groups' squared norms, their dots (pairs i < j)], where the
      groups are the ``explicit`` pieces (None: zero) and, with ``complement``, the total
      minus them;
    - the rank-1 probe of every tensor in ``probed`` against ``vectors`` ((v, z) for
      a 2-D view, (z,) for 1-D). The scale is ‖t‖·‖v‖·‖z‖/√(numel): for random
      Gaussian v, z, rounding errors E in t move the probe by about ‖E‖, so it bounds
      them with a wide margin, and a missing gradient M is caught once ‖M‖ exceeds
      the rounding tolerance times ‖t‖.

    ``keep_rows`` (0/1 per row of the stats, not of the probes) leaves rows out of the stats.
    No gradient-sized temporary is made. Accumulates in float32 (float64 when any input is).
    """
    wide = total.dtype == torch.float64 or any(e is not None and e.dtype == torch.float64 for e in explicit)
    dtype = torch.float64 if wide else torch.float32  # bf16/fp16 pieces and totals are widened block by block
    rows = total.shape[0] if total.dim() >= 1 else 1
    cols = total.numel() // max(rows, 1)
    view = lambda t: _dense(t).reshape(rows, cols)  # noqa: E731
    t2 = view(total)
    flats = [None if e is None else view(e) for e in explicit]
    probed = [view(p) for p in probed]
    v, z = (None, None) if not probed else (vectors[0], vectors[1]) if len(vectors) == 2 else (None, vectors[0])
    k = len(flats) + complement
    pairs = pair_names(range(k))
    acc = torch.zeros(1 + k + len(pairs), dtype=dtype, device=total.device)
    found = torch.zeros(len(probed), 2, dtype=dtype, device=total.device)  # (value, ‖t‖²)
    step = max(1, CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        tc = t2[r0 : r0 + step].to(dtype)
        blocks = [torch.zeros_like(tc) if f is None else f[r0 : r0 + step].to(dtype) for f in flats]
        if keep_rows is not None:
            keep = keep_rows[r0 : r0 + step].to(dtype).unsqueeze(1)
            tc, blocks = tc * keep, [b * keep for b in blocks]
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
            flat_block = block.reshape(-1)
            found[n] += torch.stack([value, flat_block @ flat_block])
    if not probed:
        return NormPass(acc, [])
    size = (v.norm() if v is not None else 1.0) * z.norm() / max(total.numel(), 1) ** 0.5
    return NormPass(acc, [Probe(found[n, 0], found[n, 1].sqrt() * size) for n in range(len(probed))])


def _dense(t) -> torch.Tensor:
    return t.dense() if isinstance(t, IndexedRows) else t
