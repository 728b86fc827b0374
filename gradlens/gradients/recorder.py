"""``GradientRecorder``: hooks on an unmodified model that split backward passes into row groups.

How it works, in order:
1. At construction the model is checked (rows must be independent along dim 0,
   see ``rules.validate``). Every module that owns parameters (directly) gets a
   forward hook; the model is not wrapped and its ``forward`` is untouched. Every
   parameter gets a tensor hook that sees its real gradient, once per backward.
2. Each forward call with grad enabled is paired with that call's output
   gradient. Pairing per *call* (not per module) is what makes activation
   checkpointing safe: a recomputed forward registers its own hook, a no-grad
   forward registers none. Two kinds of pairing:
   - *split* (linear layers, the default): the hook re-parents the output onto
     ``route.SplitBackward`` (same storage and values), whose backward computes
     the weight gradient as the sum of the groups' pieces: no extra product.
   - *observed* (every other rule, or ``split_backward=False``): a hook on the
     output tensors reads the output gradient; the rule computes the pieces.
3. Inside ``capture()`` each use goes to the ``Capture``; outside a capture
   observed hooks do nothing and split layers compute their usual gradient.

What the hooks change, outside and inside captures: split layers' outputs are
new tensors (a view of the same storage with the same values; only ``grad_fn``
differs). An output of batch 1 that the model broadcasts over a batch of N rows
(GPT-2's position embeddings) is expanded to N rows (a view, no copy) so that
its gradient arrives per row; consumers that broadcast see the same values.
``p.grad`` equals a plain backward up to float rounding (split layers sum the
groups' pieces), or bit for bit with ``split_backward=False``.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Iterator, Mapping, Optional

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from . import route
from .capture import Capture
from .fsdp import ShardedParams
from .groups import GroupSpec, make_groups
from .params import ParamIndex, world_size
from .precision import autocast_state, no_autocast
from .rules import Rule, Use, rule_for, tensor_leaves, validate
from .state import PendingUses


def _expand_rows(x, n: int):
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    return x


def uncompiled(model: nn.Module) -> nn.Module:
    """The module the recorder attaches to: ``model`` itself, or, for ``torch.compile(model)``
    (an ``OptimizedModule``), the module it compiled, so parameter names have no ``_orig_mod.``.

    A compiled forward is recorded exactly, whether the model was compiled before or after
    the recorder attached: every recorder hook runs outside compilation (``compile_safe``),
    so the compiler splits its graph at each parameter-owning module, and the hooks see
    real tensors, as in eager mode. The price is those graph breaks: such a forward runs
    module by module, close to eager speed.
    """
    orig = getattr(model, "_orig_mod", None)
    if isinstance(orig, nn.Module) and type(model).__name__ == "OptimizedModule":
        return orig
    return model


def compile_safe(fn):
    """``fn``, run eagerly even when called from a ``torch.compile``'d forward: there it goes
    through ``torch.compiler.disable``, so the compiler breaks its graph around it. Outside
    compilation it is called directly (no compiler import, no wrapper cost)."""
    eager = []

    def hook(*args, **kwargs):
        if torch.compiler.is_compiling():
            if not eager:
                eager.append(torch.compiler.disable(fn))
            return eager[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return hook


def _accumulation_dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(recurse=False))
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class GradientRecorder:
    """Record per-group gradient norms of an ``nn.Module`` without modifying it.

    >>> rec = GradientRecorder(model)
    >>> with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}) as cap:
    ...     loss.backward()
    >>> cap.norm("chosen"), cap.norm("rejected"), cap.cosine("chosen", "rejected")
    >>> rec.close()

    ``split_backward=False`` keeps every layer's own backward, so ``p.grad`` is bit-identical
    to a run without the recorder, at the cost of one extra half product per linear layer.

    Gradient accumulation: one capture may span several backward calls when opened with
    ``accumulate=True``; call ``cap.set_groups(...)`` before each later micro-batch's
    backward. The recorded pieces are summed exactly like ``p.grad`` is.
    """

    def __init__(self, model: nn.Module, *, probe_seed: int = 0, split_backward: bool = True):
        model = uncompiled(model)
        validate(model)
        self.model = model
        self.index = ParamIndex(model, probe_seed=probe_seed)  # names, owners, probe vectors
        # FSDP2-sharded parameters (gradients/fsdp.py), else None; raises for sharding it cannot split.
        self.sharded: Optional[ShardedParams] = ShardedParams.detect(model)
        # FSDP2 swaps in unsharded copies around each use: keep its own backward there.
        self.split_backward = split_backward and self.sharded is None
        self._capture: Optional[Capture] = None
        self._paused = 0
        self._closed = False
        self._handles: list = []
        self._rng_before: dict[int, tuple] = {}
        self._pending: dict[int, PendingUses] = {}  # tied parameters' forward uses not yet seen in backward
        self._batch_rows: Optional[int] = None
        self.rules: dict[str, Rule] = {}
        self._attach()

    # ---- hooks -------------------------------------------------------------------------------

    def _attach(self) -> None:
        eager = compile_safe  # hooks run eagerly, also inside a torch.compile'd forward (see uncompiled)
        self._handles.append(self.model.register_forward_pre_hook(eager(self._note_batch_rows), with_kwargs=True))
        for path, module in self.model.named_modules():
            wanted = tuple(n for n, p in module.named_parameters(recurse=False) if p.requires_grad)
            if not wanted:
                continue
            rule = rule_for(module)
            self.rules[path] = rule
            shared = [n for n in wanted if self.index.is_shared(getattr(module, n))]
            if shared and self.sharded is None:  # tied: note each forward use, dense or sparse rows
                self._handles.append(module.register_forward_hook(eager(self._note_use(rule, shared))))
            if rule.reruns_forward:
                self._handles.append(module.register_forward_pre_hook(eager(self._save_rng)))
            self._handles.append(module.register_forward_hook(eager(self._forward_hook(path, rule, wanted)), with_kwargs=True))
        for p in self.index.trainable():
            self._handles.append(p.register_hook(self._param_hook(p)))

    def _note_use(self, rule: Rule, names: list[str]):
        """Forward hook: a use of tied parameters, so a capture knows which uses are still to come."""

        def hook(module: nn.Module, args: tuple, output) -> None:
            if self._paused or self._closed or not torch.is_grad_enabled():
                return
            for name in names:
                pending = self._pending.setdefault(id(getattr(module, name)), PendingUses())
                if rule.sparse_rows is not None:
                    pending.rows.append(rule.sparse_rows(Use(module, args, {}, (), (name,), torch.float32)))
                else:
                    pending.dense += 1

        return hook

    def _note_batch_rows(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The batch size N of the model's input: rows are counted along its dim 0."""
        first = next((t for t in tensor_leaves((args, kwargs), floating=False) if t.dim() > 0), None)
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
        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            if self._paused or self._closed or not torch.is_grad_enabled():
                return None
            rng = self._rng_before.pop(id(module), None)
            n = self._batch_rows
            result = None
            if isinstance(output, torch.Tensor) and output.requires_grad and n and n > 1 and output.dim() and output.shape[0] == 1:
                # A batch-1 output broadcast over the batch (e.g. GPT-2's position embeddings):
                # expand it so its gradient arrives per row. The consumer then adds equal
                # shapes and ExpandBackward reduces with the same sum_to_size, so the
                # parameter gradient is unchanged.
                output = result = output.expand(n, *output.shape[1:])
                args, kwargs = tree_map(lambda x: _expand_rows(x, n), (args, kwargs))
            use = Use(module, args, kwargs, (), wanted, _accumulation_dtype(module), rng, autocast_state(), self._paused_call)
            if self.split_backward and route.can_route(rule, module, args, kwargs, output):
                return route.route(output, args[0], module, use, rule, lambda u: self._weight_grads(u, rule, path))
            self._observe(output, use, rule, path)
            return result

        return hook

    def _observe(self, output, use: Use, rule: Rule, path: str) -> None:
        leaves = tensor_leaves(output)
        needs = [i for i, t in enumerate(leaves) if t.requires_grad]
        if not needs:
            return
        # The hook must not reference the output tensors it is registered on: their
        # grad_fn holds the hook, and that cycle through C++ is never collected.
        num_leaves = len(leaves)

        def on_grads(grads) -> None:
            full = [None] * num_leaves
            for i, g in zip(needs, grads):
                full[i] = g
            cap = self._capture
            if cap is not None and not self._closed:
                with no_autocast():  # a backward inside an autocast block must not make the recorder's products bf16
                    cap.add_use(replace(use, grad_outputs=tuple(full)), rule, path)

        if len(needs) == 1:
            leaves[needs[0]].register_hook(lambda g: on_grads((g,)))
        else:
            torch.autograd.graph.register_multi_grad_hook([leaves[i] for i in needs], on_grads)

    def _weight_grads(self, use: Use, rule: Rule, path: str) -> dict[str, torch.Tensor]:
        """A split layer's full parameter gradients, in each parameter's dtype: the open capture's
        sum of group pieces, else the rule's product over all rows."""
        cap = self._capture
        with no_autocast():  # the rule replays the forward's casts itself (route.can_route)
            if cap is None or self._closed:
                grads = rule.contribution(use, lambda x: x)
                return {name: g.to(getattr(use.module, name).dtype) for name, g in grads.items()}
            return cap.add_use(use, rule, path, totals=True)

    def _param_hook(self, p: torch.nn.Parameter):
        def hook(grad: torch.Tensor) -> None:
            if self._capture is not None and not self._closed:
                with no_autocast():  # norms and probes in float32 even when backward runs inside autocast
                    self._capture.add_total(p, grad)

        return hook

    def _paused_call(self, fn):
        """Run ``fn`` (a rule re-running a module) with this recorder's hooks switched off."""
        self._paused += 1
        try:
            return fn()
        finally:
            self._paused -= 1

    # ---- public API --------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(
        self,
        groups: Mapping[str, GroupSpec],
        *,
        num_rows: int | None = None,
        per_row: bool = False,
        verify: bool = False,
        accumulate: bool = False,
        distributed: str | None = None,
        keep_pieces: bool = False,
    ) -> Iterator[Capture]:
        """Record the backward calls made inside the block, split by row ``groups``.

        ``groups`` maps names to slices or index tensors over dim 0; rows in no group
        are ignored (give ``num_rows`` when such rows come after the last group).
        ``per_row=True`` also records each row's own gradient norm (ghost norms where
        cheaper). ``verify=True`` computes every group explicitly instead of taking the
        last one as the remainder (slower; for tests and audits).

        By default a capture holds one backward pass, and each parameter's norms are
        taken the moment its gradient is complete, so no gradient-sized buffer outlives
        its layer. ``accumulate=True`` lets several backward calls (micro-batches) add up,
        like ``p.grad``; that keeps one buffer per explicitly computed group per parameter
        until the block ends.

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
            distributed = "global" if world_size() > 1 else "local"
        self._check_parameters_unchanged()
        if self.sharded is not None:
            self.sharded.begin(distributed=distributed, per_row=per_row, keep_pieces=keep_pieces)
        cap = Capture(
            self.index, make_groups(groups, num_rows), per_row=per_row, verify=verify, accumulate=accumulate,
            distributed=distributed, keep_pieces=keep_pieces, sharded=self.sharded, pending=self._pending,
        )
        self._capture = cap
        try:
            yield cap
        finally:
            self._capture = None
        self._pending.clear()  # a later forward starts afresh
        with no_autocast():
            cap.finish()

    def _check_parameters_unchanged(self) -> None:
        """Hooks sit on the parameters seen at attach time; a replaced parameter (e.g. by
        ``fully_shard`` after attaching) would silently record nothing. Under FSDP2 the
        module holds FSDP's unsharded copies between forward and backward: expected."""
        if self.sharded is not None:
            return
        for name, p in self.model.named_parameters():
            if p.requires_grad and not self.index.knows(p):
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
