"""What a recorder knows about its model's parameters: names, owning modules, probe vectors.

This is the whole interface a ``Capture`` needs from its ``GradientRecorder``
(besides the ``Use``s it is handed): built once when the recorder attaches.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class ParamIndex:
    """Names and owners of a model's parameters, and each one's fixed random probe vectors."""

    def __init__(self, model: nn.Module, *, probe_seed: int = 0):
        self.model = model
        self._probe_seed = probe_seed
        self._probes: dict[int, tuple[torch.Tensor, ...]] = {}
        self._names: dict[int, str] = {}
        self._owners: dict[int, list[str]] = {}
        self._described: dict[int, tuple[str, list[str]]] = {}
        for name, p in model.named_parameters():
            self._names.setdefault(id(p), name)
        for path, module in model.named_modules():
            for n, p in module.named_parameters(recurse=False):
                self._owners.setdefault(id(p), []).append(f"{path}.{n}" if path else n)

    def trainable(self) -> list[nn.Parameter]:
        """Unique parameters that need gradients, in ``model.parameters()`` order (same on every rank)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def describe(self, p: nn.Parameter) -> tuple[str, list[str]]:
        """(name, owning module paths); a tied parameter has several owners."""
        known = self._described.get(id(p))
        if known is None:
            owners = self._owners.get(id(p), [])
            modules = [o.rsplit(".", 1)[0] if "." in o else "" for o in owners]
            known = self._described[id(p)] = (self._names.get(id(p), owners[0] if owners else "?"), modules)
        return known[0], list(known[1])

    def knows(self, p: nn.Parameter) -> bool:
        """Whether ``p`` is a parameter the model had when the recorder attached."""
        return id(p) in self._names

    def is_shared(self, p: nn.Parameter) -> bool:
        return len(self._owners.get(id(p), ())) > 1

    def without_grad(self) -> set[int]:
        """Parameters whose ``.grad`` is None now; their final ``.grad`` will be exactly the
        captured total. Not under multi-process DDP, where ``.grad`` becomes the all-reduced mean."""
        if world_size() > 1:
            return set()
        return {id(p) for p in self.trainable() if p.grad is None}

    def probe_vectors(self, p: nn.Parameter) -> tuple[torch.Tensor, ...]:
        """Fixed random probe vectors for ``p`` (own generator: the global RNG is untouched)."""
        vectors = self._probes.get(id(p))
        if vectors is None:
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            gen = torch.Generator().manual_seed(self._probe_seed + len(self._probes))
            shapes = (p.shape[0], p.numel() // p.shape[0]) if p.dim() >= 2 else (p.numel(),)
            vectors = tuple(torch.randn(s, generator=gen, dtype=dtype).to(p.device) for s in shapes)
            self._probes[id(p)] = vectors
        return vectors
