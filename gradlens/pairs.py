"""The ``[chosen; rejected]`` row layout of a preference batch, encoded once.

A batch of b preference pairs has 2b rows along dim 0: the b chosen rows first,
then the b rejected rows, pair i at rows i and b + i. This is TRL's layout
(``DataCollatorForPreference``), the one ``gradlens record`` builds, and the one
the recorder's row groups describe. Everything that builds, splits or names such
rows goes through these helpers, so the layout lives in one place.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import torch

CHOSEN = "chosen"
REJECTED = "rejected"
SIDES = (CHOSEN, REJECTED)

T = TypeVar("T")


def pair_groups(num_pairs: int) -> dict[str, slice]:
    """Row groups of a batch of ``num_pairs`` pairs, for ``GradientRecorder.capture(groups=...)``."""
    return {CHOSEN: slice(0, num_pairs), REJECTED: slice(num_pairs, 2 * num_pairs)}


def split_pairs(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rows, rejected rows) of a tensor whose dim 0 has the 2b rows of b pairs."""
    if rows.shape[0] % 2:
        raise ValueError(f"a preference batch holds [chosen; rejected] rows, got an odd number of rows ({rows.shape[0]})")
    chosen, rejected = rows.chunk(2, dim=0)
    return chosen, rejected


def join_pairs(chosen: Sequence[T], rejected: Sequence[T]) -> list[T]:
    """Rows in batch order from the per-pair chosen and rejected items (same length)."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen rows but {len(rejected)} rejected rows")
    return [*chosen, *rejected]


def row_sides(num_pairs: int) -> list[tuple[int, str]]:
    """(pair index within the batch, side) of every row, in batch order."""
    return [(i, side) for side in SIDES for i in range(num_pairs)]
