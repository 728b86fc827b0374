"""Named row groups: which rows of the batch (dim 0) belong to "chosen", "rejected", ...

Groups are validated once, when a capture starts, so hooks never see bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch

GroupSpec = Union[slice, Sequence[int], torch.Tensor]


@dataclass(frozen=True)
class RowGroups:
    """Validated groups over ``num_rows`` rows.

    ``rows[name]`` is a slice (contiguous groups select a view, no copy) or a
    LongTensor of row indices. ``partition`` is True when the groups cover every
    row exactly once: then the last group's gradient can be taken as the total
    minus the others, which saves one matrix product per layer.
    """

    names: tuple[str, ...]
    rows: dict[str, Union[slice, torch.Tensor]]
    num_rows: int
    partition: bool

    def select(self, name: str, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows[name]
        if isinstance(rows, slice):
            return x[rows]
        return x.index_select(0, rows.to(x.device))


def _indices(name: str, spec: GroupSpec) -> torch.Tensor:
    if isinstance(spec, slice):
        if spec.step not in (None, 1):
            raise ValueError(f"group {name!r}: slices must have step 1, got {spec}")
        start, stop = spec.start or 0, spec.stop
        if stop is None:
            raise ValueError(f"group {name!r}: slice needs an explicit stop, got {spec}")
        if start < 0 or stop < 0:
            raise ValueError(f"group {name!r}: negative slice bounds are not allowed, got {spec}")
        return torch.arange(start, stop)
    idx = torch.as_tensor(spec)
    if idx.dtype == torch.bool:
        raise ValueError(f"group {name!r}: give row indices, not a boolean mask (use mask.nonzero().flatten())")
    if idx.ndim != 1 or idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"group {name!r}: expected a slice or a 1-D integer index tensor, got dtype {idx.dtype} and shape {tuple(idx.shape)}")
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"group {name!r}: negative row index {int(idx.min())}")
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"group {name!r}: repeated row indices")
    return idx.to(torch.int64).cpu()


_SLICE_GROUPS: dict[tuple, RowGroups] = {}  # groups given as slices, validated once (a training loop repeats them)


def make_groups(groups: Mapping[str, GroupSpec], num_rows: int | None = None) -> RowGroups:
    """Validate ``groups``; ``num_rows`` defaults to one past the largest index."""
    if groups and all(isinstance(spec, slice) for spec in groups.values()):
        key = (tuple((str(name), spec.start, spec.stop, spec.step) for name, spec in groups.items()), num_rows)
        if key not in _SLICE_GROUPS:
            if len(_SLICE_GROUPS) > 256:
                _SLICE_GROUPS.clear()
            _SLICE_GROUPS[key] = _validate(groups, num_rows)
        return _SLICE_GROUPS[key]
    return _validate(groups, num_rows)


def _validate(groups: Mapping[str, GroupSpec], num_rows: int | None) -> RowGroups:
    if not groups:
        raise ValueError("capture needs at least one row group, e.g. {'chosen': slice(0, B), 'rejected': slice(B, 2 * B)}")
    indices = {str(name): _indices(str(name), spec) for name, spec in groups.items()}
    # A group may be empty in one micro-batch (no negative-advantage completion in it): its
    # gradient piece is zero there. A capture with no rows at all is a mistake.
    if all(idx.numel() == 0 for idx in indices.values()):
        raise ValueError(f"every row group is empty ({', '.join(map(repr, indices))})")
    largest = max(int(idx.max()) for idx in indices.values() if idx.numel())
    if num_rows is None:
        num_rows = largest + 1
    elif largest >= num_rows:
        raise ValueError(f"row index {largest} is out of range for a batch of {num_rows} rows")
    owner = torch.full((num_rows,), -1, dtype=torch.int64)
    for k, (name, idx) in enumerate(indices.items()):
        clash = owner[idx] >= 0
        if clash.any():
            other = list(indices)[int(owner[idx][clash][0])]
            raise ValueError(f"groups {other!r} and {name!r} overlap (row {int(idx[clash][0])}); each row may be in one group only")
        owner[idx] = k
    rows: dict[str, Union[slice, torch.Tensor]] = {}
    for name, idx in indices.items():
        if idx.numel() == 0:
            rows[name] = slice(0, 0)
            continue
        contiguous = bool((idx[1:] - idx[:-1] == 1).all()) if idx.numel() > 1 else True
        rows[name] = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
    partition = bool((owner >= 0).all()) and len(indices) > 1
    return RowGroups(names=tuple(indices), rows=rows, num_rows=num_rows, partition=partition)
