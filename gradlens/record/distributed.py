"""Data-parallel recording: `torchrun --nproc_per_node N -m gradlens record ...`.

Each optimizer step's pairs are split into contiguous shards, one per rank;
rank r's micro-batch loss is scaled by b·N/B so that DDP's averaged ``p.grad``
is the full-batch mean gradient, exactly as in a single process. The recorder
(``capture(distributed="global")``, its default under a process group)
all-reduces the chosen and total pieces, so every rank holds the norms of the
global gradient. Per-pair diagnostics are gathered to every rank. Only rank 0
writes logs, TensorBoard, checkpoints and evaluations.

gloo is used on CPU, nccl on CUDA. `accelerate launch` sets the same
environment variables as torchrun (RANK, WORLD_SIZE, MASTER_ADDR, ...), so
`accelerate launch -m gradlens record ...` takes the same path.

``--fsdp`` shards the policy with FSDP2 (``fully_shard`` on every transformer
block, then the root) instead of replicating it under DDP. FSDP averages
gradients over ranks like DDP, so the loss scaling is the same; the recorder
sees a sharded model and reduce-scatters its pieces (``gradients/fsdp.py``).
Forwards need every rank, so all ranks evaluate (rank 0 logs) and all ranks
gather a full state dict for a checkpoint, which rank 0 writes in the usual
format through an unsharded CPU copy of the policy.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's contiguous block of the step's pairs (sizes differ by at most one)."""
        n = len(indices)
        if n < self.world:
            raise ValueError(f"--batch-size {n} is smaller than the {self.world} processes; each needs at least one pair")
        start = self.rank * n // self.world
        return list(indices[start : (self.rank + 1) * n // self.world])

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the policy for training forwards (the recorder hooks the inner module);
        an FSDP2-sharded policy is used as it is."""
        if self.world == 1 or is_sharded(model):
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: nn.Module, sync: bool):
        """Skip DDP's all-reduce on all but the last micro-batch of a step."""
        if self.world == 1 or sync or not hasattr(model, "no_sync"):  # FSDP2: it reduce-scatters each micro-batch
            return contextlib.nullcontext()
        return model.no_sync()

    def fully_shard(self, model: nn.Module) -> nn.Module:
        """FSDP2 in place: each transformer block (the model's ``_no_split_modules``), then the root."""
        from torch.distributed.fsdp import fully_shard

        blocks = set(_no_split_modules(model))
        for module in list(model.modules()):
            if module is not model and type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
        return model

    def gather(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Concatenate each tensor over ranks, in rank order (shards are contiguous, so
        this is the single-process pair order)."""
        if self.world == 1:
            return list(tensors)
        everything: list = [None] * self.world
        dist.all_gather_object(everything, [t.detach().cpu() for t in tensors])
        return [torch.cat([part[i] for part in everything]).to(tensors[i].device) for i in range(len(tensors))]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _no_split_modules(model: nn.Module) -> list[str]:
    """Class names of the model's transformer blocks (also through a peft wrapper)."""
    for module in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        names = getattr(module, "_no_split_modules", None)
        if names:
            return list(names)
    return []


class _SavedOptimizer:
    """An optimizer state dict that ``checkpoint.save_checkpoint`` can write like an optimizer's."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


class ShardedCheckpoints:
    """Checkpoints of an FSDP2 policy, in the same files as unsharded runs.

    ``model.safetensors`` holds the full weights (loadable without FSDP);
    ``optimizer.pt`` holds the full optimizer state keyed by parameter name
    (``torch.distributed.checkpoint.state_dict``'s full format), loaded with
    ``weights_only=True``. ``template`` is copied once, unsharded, on the CPU.
    """

    def __init__(self, template: nn.Module, ctx: DistContext):
        self.mirror = copy.deepcopy(template).cpu()
        self.ctx = ctx

    @staticmethod
    def _options(**kwargs):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kwargs)

    def save(self, run_dir: Path, step: int, policy: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], **kwargs) -> None:
        """Collective: every rank gathers, rank 0 writes (``kwargs`` go to ``checkpoint.save_checkpoint``)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        from . import checkpoint as ckpt

        options = self._options(cpu_offload=True)
        weights = get_model_state_dict(policy, options=options)
        optim = get_optimizer_state_dict(policy, optimizer, options=options)
        if self.ctx.is_main:
            self.mirror.load_state_dict(weights)
            ckpt.save_checkpoint(run_dir, step, self.mirror, _SavedOptimizer(optim), state, **kwargs)
        self.ctx.barrier()

    def restore(self, point, policy: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
        """Like ``resume.restore``: (first step to run, saved state); every rank loads the full files and keeps its shard."""
        from safetensors.torch import load_model
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        from . import checkpoint as ckpt

        if point.checkpoint is None:
            return 0, {}
        path = point.checkpoint.path / ckpt.MODEL_FILE
        try:
            load_model(self.mirror, str(path), device="cpu")
            set_model_state_dict(policy, self.mirror.state_dict(), options=self._options())
        except Exception as exc:  # noqa: BLE001 - safetensors' errors are not ValueErrors
            raise ckpt.CheckpointError(f"{path}: cannot be loaded into the sharded model ({exc})") from None
        try:
            set_optimizer_state_dict(policy, optimizer, point.optimizer_state, options=self._options())
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ckpt.CheckpointError(
                f"{point.checkpoint.path / ckpt.OPTIMIZER_FILE}: does not fit this run's sharded optimizer ({exc}); "
                "was the run recorded with --fsdp?"
            ) from None
        return point.start, point.state


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def setup(device: str) -> DistContext:
    """Join the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size())


def teardown(ctx: DistContext) -> None:
    if ctx.world > 1 and dist.is_initialized():
        # No rank tears its group down while another may still be talking to it: under load a rank
        # that left early made gloo's connection threads in the other abort at exit.
        dist.barrier()
        dist.destroy_process_group()
