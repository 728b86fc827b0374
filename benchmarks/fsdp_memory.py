"""Per-rank memory of the recorder's group pieces under FSDP2, against the unsharded size.

    torchrun --nproc_per_node 2 benchmarks/fsdp_memory.py [--hidden 512 --layers 4 --vocab 16384] [--smoke]

A Llama of the given size is sharded with ``fully_shard`` (every decoder layer, then
the root), one DPO step is recorded, and every rank reports the bytes of the group
pieces it holds when backward ends (``recorder.sharded.piece_bytes``: the chosen
piece of every parameter, as this rank's rows; the rejected piece is the total
minus chosen) and the largest full-size piece it split at once
(``temporary_bytes``: one use of one parameter). "unsharded" is what one process
without FSDP holds for the same pieces: one float32 copy of every parameter.
CPU + gloo; the counts are exact byte counts of the buffers, not allocator stats.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import gradlens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--pairs", type=int, default=2, help="pairs per rank")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="a tiny model (seconds)")
    args = ap.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.seq = 32, 2, 128, 8
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=8 if args.hidden >= 64 else 2, num_key_value_heads=8 if args.hidden >= 64 else 2,
                         max_position_embeddings=args.seq, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    numel = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    rec = gradlens.GradientRecorder(model)
    b = args.pairs
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab, (2 * b, args.seq), generator=g)
    logits = model(input_ids=ids).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
    ref = lp.detach() - 0.1
    loss = gradlens.preference_loss(lp[:b], lp[b:], ref[:b], ref[b:], beta=0.1).loss
    with rec.capture(groups={"chosen": slice(0, b), "rejected": slice(b, 2 * b)}) as cap:
        loss.backward()
    shard_bytes = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
    mine = {"rank": rank, "piece_bytes": rec.sharded.piece_bytes, "temporary_bytes": rec.sharded.temporary_bytes, "param_shard_bytes": shard_bytes}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        unsharded = numel * 4
        print(f"Llama {args.layers} x {args.hidden}, vocab {args.vocab}: {numel / 1e6:.2f} M parameters; {world} ranks (CPU, gloo)")
        print(f"unsharded pieces (one process): {unsharded / 2**20:.2f} MiB")
        for r in everyone:
            print(f"rank {r['rank']}: pieces {r['piece_bytes'] / 2**20:.2f} MiB = {r['piece_bytes'] / unsharded:.3f} x unsharded "
                  f"(1/world = {1 / world:.3f}); largest temporary {r['temporary_bytes'] / 2**20:.2f} MiB; "
                  f"parameter shard {r['param_shard_bytes'] / 2**20:.2f} MiB")
        print(json.dumps({"parameters": numel, "world": world, "unsharded_bytes": unsharded, "ranks": everyone,
                          "chosen": cap.norm("chosen"), "rejected": cap.norm("rejected")}))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
