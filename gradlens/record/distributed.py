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
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Sequence

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
        """DDP around the policy for training forwards (the recorder hooks the inner module)."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, model: nn.Module, sync: bool):
        """Skip DDP's all-reduce on all but the last micro-batch of a step."""
        if self.world == 1 or sync:
            return contextlib.nullcontext()
        return model.no_sync()

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
        dist.destroy_process_group()
