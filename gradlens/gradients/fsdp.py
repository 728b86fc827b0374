"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the global split with group pieces sharded like the parameters.

Why FSDP needs its own path. ``fully_shard`` replaces every parameter by a
``DTensor`` holding this rank's rows (``Shard(0)``). Forward and backward use a
separate, unsharded copy that FSDP all-gathers and frees again; the sharded
parameter never sees autograd, so tensor hooks on it never fire, and its
``.grad`` is written by FSDP's reduce-scatter (the mean over ranks, of this
rank's rows only). The plain recorder therefore had no total and reported 0.

What happens here instead:
- module hooks still see the unsharded weights (they run inside FSDP's
  all-gather window), so every rule computes this rank's full-size piece of
  one use, exactly as without FSDP;
- each piece is reduce-scattered at once into this rank's rows and averaged
  over ranks, as FSDP does with ``.grad``; only shards are kept, so the pieces
  take about 1/world_size of the unsharded memory (plus one full-size
  temporary for the use being split) and no full-size gradient is all-reduced;
- the total is FSDP's own sharded ``.grad`` (minus its value when the capture
  began); the norms and the probe of each parameter are taken on this rank's
  shard in one pass, and their partial sums over rows are added over ranks in
  one all-reduce per capture: a few scalars per parameter.

Collectives run inside backward, in the order autograd reaches the modules,
which is the same on every rank; they use a process group of their own so they
never interleave with FSDP's. Supported: FSDP2 on a 1-D mesh with ``Shard(0)``
placements (its default) and the default gradient divide factor (the mean).
Anything else sharded -- tensor parallelism, HSDP's 2-D mesh, other shard
dims, DeepSpeed ZeRO-3 partitions -- raises at attach time, never a silent 0.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .rules import IndexedRows
from .state import LOW_PRECISION_RTOL, PROBE_RTOL, ParamState, Probe, pair_names, probe_agrees, set_norms


class UnsupportedShardingError(ValueError):
    """The model's parameters are sharded in a way the recorder cannot split."""


def _dtensor_type():
    # A model can only hold DTensors once torch.distributed.tensor was imported: skip the import otherwise.
    if "torch.distributed.tensor" not in sys.modules:
        return None, None
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def _check_deepspeed(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
            raise UnsupportedShardingError(
                f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3; gradlens cannot split its gradient (DeepSpeed "
                "gathers and partitions parameters in its own hooks and is not tested here). Use FSDP2 (fully_shard), "
                "DDP or a single process"
            )


class ShardedParams:
    """The FSDP2-sharded parameters of one model and the collectives that keep group pieces sharded."""

    def __init__(self, model: nn.Module, group, world: int):
        self.model = model
        self.group = group
        self.world = world
        self.rank = dist.get_rank(group)
        self.device = next(p for p in model.parameters()).to_local().device  # gloo: CPU, nccl: this rank's GPU
        # Module -> its own parameters as registered now (the sharded DTensors): the keys of
        # every piece, whatever unsharded copy the module holds during forward and backward.
        self._own = {id(m): dict(m.named_parameters(recurse=False)) for m in model.modules()}
        self._start: dict[int, torch.Tensor] = {}
        self.piece_bytes = 0  # bytes of group pieces held at the end of the last capture (this rank)
        self.temporary_bytes = 0  # largest full-size piece split at once (one use of one parameter)

    @classmethod
    def detect(cls, model: nn.Module) -> Optional["ShardedParams"]:
        """``None`` for a model without sharded parameters; raises for sharding it cannot split."""
        _check_deepspeed(model)
        DTensor, Shard = _dtensor_type()
        if DTensor is None:
            return None
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()  # after a forward the root may still hold its unsharded copies: register the shards
        sharded = [(n, p) for n, p in model.named_parameters() if isinstance(p, DTensor)]
        if not sharded:
            return None
        if not any(isinstance(m, FSDPModule) for m in model.modules()):
            name = sharded[0][0]
            raise UnsupportedShardingError(
                f"parameter {name!r} is a DTensor but the model is not sharded by FSDP2 (fully_shard); tensor-parallel "
                "and other DTensor layouts are not supported by the recorder"
            )
        meshes = set()
        for name, p in sharded:
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise UnsupportedShardingError(
                    f"parameter {name!r} is sharded as {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; the recorder "
                    "supports FSDP2's default: Shard(0) on a 1-D mesh (no HSDP, no shard_placement_fn)"
                )
            meshes.add(tuple(p.device_mesh.mesh.flatten().tolist()))
        unsharded = [n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
        if unsharded:
            raise UnsupportedShardingError(
                f"parameters {unsharded[:3]} are not sharded while others are; apply fully_shard to the root module too "
                "(fully_shard(model) after its blocks) so every parameter is managed by FSDP2"
            )
        if len(meshes) > 1:
            raise UnsupportedShardingError(f"parameters are sharded over different sets of ranks {sorted(meshes)}; the recorder supports one")
        ranks = list(meshes.pop())
        # A group of our own, so these collectives never interleave with FSDP's on its group.
        group = dist.new_group(ranks=ranks)
        return cls(model, group, len(ranks))

    # ---- hooks used by the recorder and the capture --------------------------------------------

    def own_params(self, module: nn.Module) -> dict[str, nn.Parameter]:
        return self._own[id(module)]

    def begin(self, *, distributed: str, per_row: bool, keep_pieces: bool = False) -> None:
        """Start a capture: check its options, note every ``.grad`` shard (captures may follow accumulation)."""
        if distributed != "global":
            raise ValueError(
                "an FSDP2-sharded model has no per-rank gradient to split (FSDP reduce-scatters it in backward); "
                "use distributed='global'"
            )
        if per_row:
            raise ValueError("per-row norms are not recorded for FSDP2-sharded models (each rank only sees its own rows)")
        if keep_pieces:
            raise ValueError("keep_pieces is not available for FSDP2-sharded models: each rank holds only its rows of every piece")
        self._start = {id(p): p.grad.to_local().detach().clone() for p in self.params() if p.grad is not None}
        self.temporary_bytes = 0

    def scatter(self, p: nn.Parameter, piece) -> torch.Tensor:
        """This rank's rows of the mean over ranks of ``piece`` (full-size, this rank's use)."""
        if isinstance(piece, IndexedRows):
            piece = piece.dense()
        piece = piece.detach()
        self.temporary_bytes = max(self.temporary_bytes, piece.numel() * piece.element_size())
        rows = p.shape[0]
        chunk = math.ceil(rows / self.world)  # torch.chunk's split, which FSDP2 uses
        if chunk * self.world == rows:
            padded = piece.contiguous()
        else:  # the last ranks' rows are padding, as in FSDP's own reduce-scatter
            padded = piece.new_zeros((chunk * self.world, *piece.shape[1:]))
            padded[:rows] = piece
        out = piece.new_empty((chunk, *piece.shape[1:]))
        dist.reduce_scatter_tensor(out, padded, group=self.group)
        start, stop = self._rows(p)
        return out[: stop - start].div_(self.world)

    def params(self) -> list[nn.Parameter]:
        """Every sharded parameter that needs a gradient, in the same order on every rank."""
        return list({id(p): p for p in self.model.parameters() if p.requires_grad}.values())

    def set_totals(self, states: list[ParamState]) -> None:
        """Each parameter's total: FSDP's sharded ``.grad`` (this rank's rows), minus its value at the start."""
        for st in states:
            local = st.param.grad.to_local().detach() if st.param.grad is not None else None
            start = self._start.get(id(st.param))
            if local is not None and start is not None:
                local = local - start
            st.total = local.to(st.dtype) if local is not None else torch.zeros(self._local_shape(st.param), dtype=st.dtype, device=self.device)
        self.piece_bytes = sum(t.numel() * t.element_size() for st in states for t in st.groups.values())
        self._start = {}

    def local_vectors(self, p: nn.Parameter, index) -> tuple[torch.Tensor, ...]:
        """``p``'s probe vectors restricted to this rank's rows (the row vector is the one sliced)."""
        vectors = index.probe_vectors(p)
        start, stop = self._rows(p)
        return (vectors[0][start:stop],) + tuple(vectors[1:])

    def reduce(self, states: list[ParamState], probes: list[Probe], names: tuple[str, ...]) -> None:
        """One all-reduce for the whole capture: every parameter's probe sums (of its total, partial
        over rows, and of the hooks' uses) and its squared norms and dots (partial over rows).
        Then the probe check (the total's probe against the mean of every rank's hooked probes)."""
        width = 6 + 1 + len(names) + len(pair_names(names))
        rows = []
        for st, probe in zip(states, probes):
            hooks = st.probe[:2] if st.probe is not None else torch.zeros(2)
            flags = torch.tensor([float(st.uses), float(st.low_precision)])
            parts = [torch.stack([probe.value, probe.scale]), hooks, flags, st.stats]
            rows.append(torch.cat([t.to(self.device, torch.float64).reshape(-1) for t in parts]))
            st.stats = None
        table = torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.float64, device=self.device)
        dist.all_reduce(table, group=self.group)
        for st, row in zip(states, table.tolist()):
            value, scale, hooks, hook_scale, uses, low = row[:6]
            hooks, hook_scale = hooks / self.world, hook_scale / self.world
            if uses == 0 and math.isfinite(value):
                st.unattributed = value != 0.0 or scale != 0.0
            else:
                rtol = LOW_PRECISION_RTOL if low else PROBE_RTOL[st.dtype]
                st.unattributed = not probe_agrees(rtol, Probe(hooks, hook_scale), Probe(value, scale))
            set_norms(st, row[6:], names)

    # ---- helpers -------------------------------------------------------------------------------

    def _rows(self, p: nn.Parameter) -> tuple[int, int]:
        chunk = math.ceil(p.shape[0] / self.world)
        start = min(self.rank * chunk, p.shape[0])
        return start, min(start + chunk, p.shape[0])

    def _local_shape(self, p: nn.Parameter) -> tuple[int, ...]:
        start, stop = self._rows(p)
        return (stop - start, *p.shape[1:])
