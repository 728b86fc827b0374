"""Run under torchrun: DDP on gloo, record the global split of one DPO step, rank 0 writes JSON.

Usage: torchrun --nproc_per_node 2 tests/scripts/ddp_split.py OUT.json [global|local]
Each rank takes its own pairs from one global batch; the JSON holds the norms.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradlens  # noqa: E402
from models import tiny_gpt2, sequence_logps  # noqa: E402

PAIRS, T, PROMPT = 4, 8, 3


def global_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (2 * PAIRS, T), generator=g)
    ref = -torch.rand(2 * PAIRS, generator=g, dtype=torch.float64) * 10
    return ids, ref


def local_rows(rank, world):
    per = PAIRS // world
    pairs = list(range(rank * per, (rank + 1) * per))
    return pairs + [PAIRS + p for p in pairs], per


def main():
    out, mode = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "global"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_gpt2(torch.float64)
    ddp = DDP(model)
    rec = gradlens.GradientRecorder(model)
    ids, ref = global_batch()
    rows, b = local_rows(rank, world)
    lp = sequence_logps(ddp, ids[rows], PROMPT)
    loss = gradlens.preference_loss(lp[:b], lp[b:], ref[rows][:b], ref[rows][b:], beta=0.5, method="balanced").loss
    with rec.capture(groups={"chosen": slice(0, b), "rejected": slice(b, 2 * b)}, distributed=mode) as cap:
        loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    if rank == 0:
        Path(out).write_text(json.dumps({"chosen": cap.norm("chosen"), "rejected": cap.norm("rejected"),
                                         "dot": cap.dot("chosen", "rejected"), "total": cap.norm(), "grad_norm": grad_norm}))
    dist.barrier()  # neither rank tears its group down while the other may still use it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
