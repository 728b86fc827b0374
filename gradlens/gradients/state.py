"""What a capture keeps per parameter (``ParamState``), and how its norms are taken and read.

The bottom of the capture machinery: ``capture.py`` fills these states during
backward; ``distributed.py`` (DDP) and ``fsdp.py`` (FSDP2) transform lists of
them when a capture finishes. None of those modules knows the ``Capture``
class, so the finishing steps can be read (and tested) one at a time.

Norms are taken in one pass over each parameter's gradient (``stats_pass``),
in row blocks that stay in cache, and stay on the device; ``read_norms`` moves
every parameter's norms to the host with one ``.tolist()``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch

from .rules import IndexedRows

# Rounding tolerance of the probe check, relative to the magnitudes summed. When the
# model itself computed in bf16/fp16 (autocast or low-precision weights), its gradient
# carries that rounding.
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}
LOW_PRECISION_RTOL = 3e-2
LOW_PRECISION = (torch.bfloat16, torch.float16)
CHUNK = 1 << 20  # elements per block of the norms pass: bounds its temporaries


class Probe(NamedTuple):
    """A rank-1 probe ⟨v zᵀ, t⟩ of a gradient ``t`` and the magnitude scale that bounds its rounding."""

    value: torch.Tensor
    scale: torch.Tensor


@dataclass
class ParamState:
    param: torch.nn.Parameter
    name: str
    modules: list[str]
    dtype: torch.dtype  # accumulation dtype: float32, or float64 for float64 parameters
    groups: dict[str, torch.Tensor] = field(default_factory=dict)  # explicitly computed groups' pieces (dense)
    sparse: dict[str, list] = field(default_factory=dict)  # groups whose pieces so far are only IndexedRows
    total: Optional[torch.Tensor] = None  # kept totals (accumulate/global/FSDP2), unless p.grad is the total
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
    # A tied parameter whose dense use (a head) came before its sparse uses (the embedding):
    # that use's stats outside the rows R the embedding touches, and its pieces on R only.
    folded_rows: Optional[torch.Tensor] = None  # R, sorted
    folded: dict[str, torch.Tensor] = field(default_factory=dict)  # stored groups' pieces on R
    folded_stats: Optional[torch.Tensor] = None  # stats of the dense use outside R
    # results
    sq: dict[str, float] = field(default_factory=dict)
    dots: dict[tuple[str, str], float] = field(default_factory=dict)
    total_sq: float = 0.0
    unattributed: bool = False
    pieces: dict[str, torch.Tensor] = field(default_factory=dict)  # kept only with keep_pieces=True

    def add(self, bucket: str, t) -> None:
        """Add a use's piece to a group. Sparse rows (embeddings) stay sparse while the group has
        no dense piece: their norms are then taken over the rows the batch touched (``norms.py``)."""
        if isinstance(t, IndexedRows):
            if bucket in self.groups:  # add in place, no dense temporary
                self.groups[bucket].index_add_(0, t.index, t.values.to(self.dtype))
            else:
                self.sparse.setdefault(bucket, []).append(t)
            return
        self.densify(bucket)
        if bucket in self.groups:
            self.groups[bucket] += t.detach()
        else:  # rules return fresh tensors: keep them, no copy
            self.groups[bucket] = t.detach().to(self.dtype)

    def densify(self, bucket: str | None = None) -> None:
        """Turn a group's (or every group's) sparse pieces into one dense, parameter-shaped buffer."""
        for name in [bucket] if bucket is not None else list(self.sparse):
            parts = self.sparse.pop(name, None)
            if not parts:
                continue
            dense = self.groups.get(name)
            for part in parts:
                if dense is None:
                    dense = part.dense().to(self.dtype)
                else:
                    dense.index_add_(0, part.index, part.values.to(self.dtype))
            self.groups[name] = dense

    def add_probe(self, probe: Probe, *, real: bool) -> None:
        """Add a probe of one use (``real=False``) or of the real gradient (``real=True``)."""
        value, scale = probe.value.detach(), probe.scale.detach()
        zero = torch.zeros((), dtype=value.dtype, device=value.device)
        v = torch.stack([zero, zero, value, scale] if real else [value, scale, zero, zero])
        self.probe = v if self.probe is None else self.probe + v.to(self.probe.device)


@dataclass
class PendingUses:
    """Uses of one shared parameter made in forward whose gradients have not arrived yet."""

    dense: int = 0
    rows: list = field(default_factory=list)  # the touched rows of each pending sparse use


def probe_agrees(rtol: float, hooks: Probe, real: Probe) -> bool:
    """Whether the hooks' probe sum equals the real gradient's, to ``rtol`` of the magnitudes summed."""
    hooks_value, real_value = float(hooks.value), float(real.value)
    if not (math.isfinite(real_value) and math.isfinite(hooks_value)):
        return True  # non-finite gradients are reported as such, not as unattributed
    return abs(real_value - hooks_value) <= rtol * (float(real.scale) + float(hooks.scale)) + 1e-30


def probe_rtol(st: ParamState) -> float:
    return LOW_PRECISION_RTOL if st.low_precision else PROBE_RTOL[st.dtype]


def pair_names(names: Sequence[str]) -> list[tuple[str, str]]:
    """The pairs (a, b) of groups, a before b, in the order of every stats row."""
    return list(itertools.combinations(names, 2))


def read_norms(states: list[ParamState], names: Sequence[str]) -> None:
    """Move every parameter's norms (``st.stats``) to the host at once: one sync for all of them."""
    done = [st for st in states if st.stats is not None]
    if not done:
        return
    device = done[0].stats.device
    rows = torch.stack([st.stats.to(device, torch.float64) for st in done]).tolist()
    for st, row in zip(done, rows):
        set_norms(st, row, names)
        st.stats = None


def set_norms(st: ParamState, row: Sequence[float], names: Sequence[str]) -> None:
    """``row`` = [‖total‖², ‖group‖² for each group, ⟨a, b⟩ for each pair]."""
    st.total_sq = row[0]
    st.sq = dict(zip(names, row[1 : 1 + len(names)]))
    st.dots = dict(zip(pair_names(names), row[1 + len(names) :]))
