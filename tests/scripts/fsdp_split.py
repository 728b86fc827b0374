"""Run under torchrun: FSDP2 (fully_shard) on gloo, record the global split of one DPO step, rank 0 writes JSON.

Usage: torchrun --nproc_per_node 2 tests/scripts/fsdp_split.py OUT.json
For each model family: shard every block and the root, take this rank's pairs of
one global batch, record one step. Also checks that the setups the recorder cannot
split raise instead of reporting zeros.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradlens  # noqa: E402
from models import sequence_logps, tiny_gpt2, tiny_llama  # noqa: E402

PAIRS, T, PROMPT = 4, 8, 3


def odd_llama(dtype=torch.float32, seed: int = 0):
    """Odd row counts (vocab 41, MLP 33): FSDP pads the last rank's shard, and so must the recorder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=33, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype)


FAMILIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "odd-llama": odd_llama}


def global_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (2 * PAIRS, T), generator=g)
    ref = -torch.rand(2 * PAIRS, generator=g, dtype=torch.float64) * 10
    return ids, ref


def blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def shard(model, **kwargs):
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def local_step(model, rec, rank, world, dtype):
    ids, ref = global_batch()
    per = PAIRS // world
    pairs = list(range(rank * per, (rank + 1) * per))
    rows = pairs + [PAIRS + p for p in pairs]
    lp = sequence_logps(model, ids[rows], PROMPT)
    r = ref[rows].to(dtype)
    loss = gradlens.preference_loss(lp[:per], lp[per:], r[:per], r[per:], beta=0.5, method="balanced").loss
    with rec.capture(groups={"chosen": slice(0, per), "rejected": slice(per, 2 * per)}) as cap:
        loss.backward()
    return cap


def record_family(family, dtype, rank, world):
    model = shard(FAMILIES[family](dtype))
    rec = gradlens.GradientRecorder(model)
    cap = local_step(model, rec, rank, world, dtype)
    # FSDP's own gradient norm, from its sharded .grad: partial sums over rows, added over ranks
    sq = torch.stack([p.grad.to_local().double().pow(2).sum() for p in model.parameters()]).sum()
    dist.all_reduce(sq)
    rec.close()
    return {
        "chosen": cap.norm("chosen"), "rejected": cap.norm("rejected"), "dot": cap.dot("chosen", "rejected"),
        "total": cap.norm(), "fsdp_grad_norm": sq.sqrt().item(), "unattributed": sorted(cap.unattributed),
        "piece_bytes": rec.sharded.piece_bytes, "temporary_bytes": rec.sharded.temporary_bytes,
        "layers": cap.layer_table(),
    }


def refusals():
    """Setups the recorder cannot split must raise, never report zeros."""
    out = {}
    model = tiny_llama(torch.float32)
    rec = gradlens.GradientRecorder(model)  # attached before sharding: its hooks sit on replaced parameters
    shard(model)
    try:
        with rec.capture(groups={"chosen": slice(0, 1), "rejected": slice(1, 2)}):
            pass
        out["attached_before"] = "no error"
    except RuntimeError as exc:
        out["attached_before"] = str(exc)
    model = shard(tiny_llama(torch.float32), shard_placement_fn=lambda p: torch.distributed.tensor.Shard(1) if p.dim() == 2 else None)
    try:
        gradlens.GradientRecorder(model)
        out["shard_dim_1"] = "no error"
    except ValueError as exc:
        out["shard_dim_1"] = str(exc)
    return out


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {f"{family}/{dtype}": record_family(family, getattr(torch, dtype), rank, world)
              for family in FAMILIES for dtype in ("float32", "float64") if family != "odd-llama" or dtype == "float32"}
    result["refusals"] = refusals()
    gathered = [None] * world
    dist.all_gather_object(gathered, {k: (v["piece_bytes"], v["temporary_bytes"]) for k, v in result.items() if k != "refusals"})
    result["piece_bytes_per_rank"] = gathered
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
