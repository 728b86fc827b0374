"""The split of the *global* gradient under data parallelism (DDP, torchrun, accelerate).

Each rank records the split of its own rows. DDP's ``p.grad`` is the mean over
ranks of the local gradients, so the global chosen part is the mean of the local
chosen parts, and likewise for the total. One all-reduce per bucket (the total
and each explicitly computed group: 2 gradient-sized buffers for chosen/rejected,
i.e. about twice DDP's own traffic) makes every rank's norms those of the global
gradient. The probe check runs before the reduction, on local pieces, and its
verdict is OR-ed across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .norms import Layout
from .state import ParamState


def average_over_ranks(states: list[ParamState], layout: Layout) -> None:
    """Average every bucket (the total and each stored group) of every parameter over ranks,
    in place. ``states`` must list the same parameters in the same order on every rank."""
    buckets = [None, *layout.stored]  # None: the total
    for st in states:
        st.densify()  # the all-reduce needs every piece whole
    world = dist.get_world_size()
    device = states[0].param.device if states else torch.device("cpu")
    for bucket in buckets:
        flat = torch.cat([_buffer(st, bucket, device).reshape(-1) for st in states])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for st in states:
            n = st.param.numel()
            piece = flat[offset : offset + n].view(st.param.shape)
            if bucket is None:
                st.total, st.total_is_grad = piece, False
            else:
                st.groups[bucket] = piece
            offset += n
    flags = torch.tensor([float(st.unattributed) for st in states], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    for st, flag in zip(states, flags.tolist()):
        st.unattributed = bool(flag)


def _buffer(st: ParamState, bucket, device) -> torch.Tensor:
    t = st.total if bucket is None else st.groups.get(bucket)
    return t if t is not None else torch.zeros(st.param.shape, dtype=st.dtype, device=device)
