"""Autocast around the recorder's own arithmetic: recorded at each forward, replayed, or switched off.

Under ``torch.autocast`` a module's forward runs its matmuls in bf16/fp16, and
if ``backward()`` is called inside the autocast block, hooks fired in backward
would run theirs in bf16 too. The recorder accumulates in float32 (float64 for
float64 parameters), so its own products run with autocast off. Recompute rules
re-run a module's forward, which must be the very forward autograd saw: they
replay the autocast state noted when that forward ran, as they replay the RNG.
"""

from __future__ import annotations

import contextlib

import torch

AutocastState = tuple  # ((device_type, dtype), ...) of the autocast contexts enabled at a forward

_DEVICES = ("cpu", "cuda")


def autocast_state() -> AutocastState:
    return tuple((d, torch.get_autocast_dtype(d)) for d in _DEVICES if torch.is_autocast_enabled(d))


def autocast_as(state: AutocastState) -> contextlib.ExitStack:
    """Exactly the autocast contexts of ``state``: others off, these on with their dtype."""
    stack = contextlib.ExitStack()
    wanted = dict(state)
    for device in _DEVICES:
        if device in wanted:
            stack.enter_context(torch.autocast(device, dtype=wanted[device]))
        elif torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


_NOTHING = contextlib.nullcontext()


def no_autocast() -> contextlib.AbstractContextManager:
    """Autocast off on every device; free when it is off already (the common case, called per hook)."""
    if not any(torch.is_autocast_enabled(d) for d in _DEVICES):
        return _NOTHING
    return autocast_as(())
