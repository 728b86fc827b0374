"""``GradientRecorder``: hooks on an unmodified model that split backward passes into row groups.

How it works, in order:
1. At construction, every module that owns parameters (directly) gets a forward
   hook; the model is not wrapped and its ``forward`` is untouched. Every
   parameter gets a tensor hook that sees its real gradient.
2. Each forward call with grad enabled registers a hook on that call's output
   tensors, closing over that call's inputs. Pairing inputs with gradients per
   *call* (not per module) is what makes activation checkpointing safe: a
   recomputed forward registers its own hook, a no-grad forward registers none.
3. Inside ``capture()``, the output hooks hand each use to the ``Capture``,
   which applies the layer's rule per group. Outside a capture hooks do nothing.

The hooks only read tensors; they never return a value, so ``p.grad`` is
bit-identical with and without the recorder.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional

import torch
import torch.nn as nn

from .capture import Capture
from .fsdp import ShardedParams
from .groups import GroupSpec, make_groups
from .precision import autocast_state, no_autocast
from torch.utils._pytree import tree_map

from .rules import RECOMPUTE_RULES, Rule, Use, _tensor_leaves, rule_for


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _expand_rows(x, n: int):
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    return x


class GradientRecorder:
    """Record per-group gradient norms of an ``nn.Module`` without modifying it.

    >>> rec = GradientRecorder(model)
    >>> with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}) as cap:
    ...     loss.backward()
    >>> cap.norm("chosen"), cap.norm("rejected"), cap.cosine("chosen", "rejected")
    >>> rec.close()

    Gradient accumulation: one capture may span several backward calls; call
    ``cap.set_groups(...)`` before each micro-batch's backward when its rows differ.
    The recorded pieces are summed exactly like ``p.grad`` is.
    """

    def __init__(self, model: nn.Module, *, probe_seed: int = 0):
        self.model = model
        self._capture: Optional[Capture] = None
        self._paused = 0
        self._closed = False
        self._handles: list = []
        self._rng_before: dict[int, tuple] = {}
        self._batch_rows: Optional[int] = None
        self._probe_seed = probe_seed
        self._probes: dict[int, tuple[torch.Tensor, ...]] = {}
        self._names: dict[int, str] = {}
        self._owners: dict[int, list[str]] = {}
        self.rules: dict[str, Rule] = {}
        # FSDP2-sharded parameters (gradients/fsdp.py), else None; raises for sharding it cannot split.
        self.sharded: Optional[ShardedParams] = ShardedParams.detect(model)
        self._attach()

    # ---- hooks -------------------------------------------------------------------------------

    def _attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._note_batch_rows, with_kwargs=True))
        for name, p in self.model.named_parameters():
            self._names.setdefault(id(p), name)
        for path, module in self.model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False)]
            for n, p in own:
                self._owners.setdefault(id(p), []).append(f"{path}.{n}" if path else n)
            wanted = tuple(n for n, p in own if p.requires_grad)
            if not wanted:
                continue
            rule = rule_for(module)
            self.rules[path] = rule
            if rule.name in RECOMPUTE_RULES:
                self._handles.append(module.register_forward_pre_hook(self._save_rng))
            self._handles.append(
                module.register_forward_hook(self._forward_hook(path, rule, wanted), with_kwargs=True)
            )
        seen = set()
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                self._handles.append(p.register_hook(self._param_hook(p)))

    def _note_batch_rows(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The batch size N of the model's input: rows are counted along its dim 0."""
        first = next((t for t in _tensor_leaves((args, kwargs), floating=False) if t.dim() > 0), None)
        self._batch_rows = first.shape[0] if first is not None else None

    def _save_rng(self, module: nn.Module, args) -> None:
        if self._paused or self._closed or not torch.is_grad_enabled():
            return
        cuda = None
        p = next(module.parameters(recurse=False))
        if p.is_cuda:
            cuda = (p.device, torch.cuda.get_rng_state(p.device))
        self._rng_before[id(module)] = (torch.random.get_rng_state(), cuda)

    def _forward_hook(self, path: str, rule: Rule, wanted: tuple[str, ...]):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if self._paused or self._closed or not torch.is_grad_enabled():
                return
            rng = self._rng_before.pop(id(module), None)
            n = self._batch_rows
            if isinstance(output, torch.Tensor) and output.requires_grad and n and n > 1 and output.dim() and output.shape[0] == 1:
                # A batch-1 output broadcast over the batch (e.g. GPT-2's position embeddings):
                # expand it so its gradient arrives per row. The consumer then adds equal
                # shapes and ExpandBackward reduces with the same sum_to_size, so the
                # parameter gradient is unchanged.
                output = output.expand(n, *output.shape[1:])
                args, kwargs = tree_map(lambda x: _expand_rows(x, n), (args, kwargs))
                result = output
            else:
                result = None
            leaves = _tensor_leaves(output)
            needs = [i for i, t in enumerate(leaves) if t.requires_grad]
            if not needs:
                return result

            # The hook must not reference the output tensors it is registered on: their
            # grad_fn holds the hook, and that cycle through C++ is never collected.
            num_leaves = len(leaves)
            amp = autocast_state()

            def on_grads(grads) -> None:
                full = [None] * num_leaves
                for i, g in zip(needs, grads):
                    full[i] = g
                self._on_use(Use(module, args, kwargs, tuple(full), wanted, torch.float32, rng, autocast=amp), rule, path)

            if len(needs) == 1:
                leaves[needs[0]].register_hook(lambda g: on_grads((g,)))
            else:
                torch.autograd.graph.register_multi_grad_hook([leaves[i] for i in needs], on_grads)
            return result

        return hook

    def _param_hook(self, p: torch.nn.Parameter):
        def hook(grad: torch.Tensor) -> None:
            if self._capture is not None and not self._closed:
                self._capture.add_total(p, grad)

        return hook

    def _on_use(self, use: Use, rule: Rule, path: str) -> None:
        cap = self._capture
        if cap is None or self._closed:
            return
        p = next(use.module.parameters(recurse=False))
        use.dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        use.recompute = self._paused_call
        with no_autocast():  # a backward inside an autocast block must not make the recorder's products bf16
            cap.add_use(use, rule, path)

    def _paused_call(self, fn):
        """Run ``fn`` (a rule re-running a module) with this recorder's hooks switched off."""
        self._paused += 1
        try:
            return fn()
        finally:
            self._paused -= 1

    # ---- parameter bookkeeping used by captures ----------------------------------------------

    def _describe(self, p: torch.nn.Parameter) -> tuple[str, list[str]]:
        owners = self._owners.get(id(p), [])
        modules = [o.rsplit(".", 1)[0] if "." in o else "" for o in owners]
        return self._names.get(id(p), owners[0] if owners else "?"), modules

    def _params_without_grad(self) -> set[int]:
        """Parameters whose ``.grad`` is None now; their final ``.grad`` will be exactly the
        captured total. Not under multi-process DDP, where ``.grad`` becomes the all-reduced mean."""
        if _world_size() > 1:
            return set()
        return {id(p) for p in self.model.parameters() if p.requires_grad and p.grad is None}

    def _is_shared(self, p: torch.nn.Parameter) -> bool:
        return len(self._owners.get(id(p), ())) > 1

    def _probe_vectors(self, p: torch.nn.Parameter) -> tuple[torch.Tensor, ...]:
        """Fixed random probe vectors for ``p`` (own generator: the global RNG is untouched)."""
        vectors = self._probes.get(id(p))
        if vectors is None:
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            gen = torch.Generator().manual_seed(self._probe_seed + len(self._probes))
            shapes = (p.shape[0], p.numel() // p.shape[0]) if p.dim() >= 2 else (p.numel(),)
            vectors = tuple(torch.randn(s, generator=gen, dtype=dtype).to(p.device) for s in shapes)
            self._probes[id(p)] = vectors
        return vectors

    # ---- public API --------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(
        self,
        groups: Mapping[str, GroupSpec],
        *,
        num_rows: int | None = None,
        per_row: bool = False,
        verify: bool = False,
        distributed: str | None = None,
        keep_pieces: bool = False,
    ) -> Iterator[Capture]:
        """Record the backward calls made inside the block, split by row ``groups``.

        ``groups`` maps names to slices or index tensors over dim 0; rows in no group
        are ignored (give ``num_rows`` when such rows come after the last group).
        ``per_row=True`` also records each row's own gradient norm (ghost norms where
        cheaper). ``verify=True`` computes every group explicitly instead of taking the
        last one as the remainder (slower; for tests and audits).

        ``distributed``: under a multi-process group (DDP), ``"global"`` (the default
        there) all-reduces the group pieces so the norms are those of the global,
        rank-averaged gradient, like ``p.grad``; ``"local"`` (default otherwise) skips
        the communication and reports this rank's own split.

        ``keep_pieces=True`` keeps every group's gradient piece of every parameter after
        the block (one parameter-sized float32 tensor per group), readable with
        ``cap.pieces(group)``: e.g. to rescale the chosen and rejected gradients before
        the optimizer step, without another backward.
        """
        if self._closed:
            raise RuntimeError("this GradientRecorder was closed; create a new one")
        if self._capture is not None:
            raise RuntimeError("a capture is already open on this recorder; captures cannot nest")
        if distributed is None:
            distributed = "global" if _world_size() > 1 else "local"
        self._check_parameters_unchanged()
        if self.sharded is not None:
            self.sharded.begin(distributed=distributed, per_row=per_row, keep_pieces=keep_pieces)
        cap = Capture(
            self, make_groups(groups, num_rows), per_row=per_row, verify=verify, distributed=distributed, keep_pieces=keep_pieces
        )
        self._capture = cap
        try:
            yield cap
        finally:
            self._capture = None
        with no_autocast():
            cap.finish()

    def _check_parameters_unchanged(self) -> None:
        """Hooks sit on the parameters seen at attach time; a replaced parameter (e.g. by
        ``fully_shard`` after attaching) would silently record nothing. Under FSDP2 the
        module holds FSDP's unsharded copies between forward and backward: expected."""
        if self.sharded is not None:
            return
        for name, p in self.model.named_parameters():
            if p.requires_grad and id(p) not in self._names:
                raise RuntimeError(
                    f"parameter {name!r} was replaced after the GradientRecorder was attached (e.g. by fully_shard or "
                    "by loading new parameter objects); its gradient would be missed. Create the recorder after sharding"
                )

    def close(self) -> None:
        """Remove every hook; the model is exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._rng_before.clear()
        self._closed = True

    def paths(self) -> dict[str, str]:
        """Module path -> rule name ('linear', 'conv1d', ..., 'fallback')."""
        return {path: rule.name for path, rule in self.rules.items()}

    def __enter__(self) -> "GradientRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
