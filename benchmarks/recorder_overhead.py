"""Recorder overhead: one DPO training step with and without gradlens, side by side.

Three step variants run interleaved (so machine noise hits all of them alike) on
a 4-layer, 256-wide GPT-2 with B pairs of T tokens:

  plain     policy forward on 2B rows, reference forward (no grad), DPO loss,
            backward, AdamW step: what a DPO trainer does
  recorder  the same step inside ``GradientRecorder.capture``, plus reading the
            norms, cosine and the per-layer table
  naive     the same step, but the chosen and rejected gradients come from two
            separate ``torch.autograd.grad`` passes (then summed into .grad)

Prints median step times and the ratios to ``plain``.
Usage: python benchmarks/recorder_overhead.py [--threads 2] [--steps 20] [--vocab 50257]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import gradlens


def sequence_logps(model, ids, prompt_len):
    logits = model(input_ids=ids).logits[:, :-1]
    logp = F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp[:, prompt_len - 1 :].sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=50257)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=256, n_layer=4, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    policy = GPT2LMHeadModel(cfg).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    B, T, prompt = args.pairs, args.seq, args.seq // 4
    ids = torch.randint(0, args.vocab, (2 * B, T))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    recorder = gradlens.GradientRecorder(policy)
    groups = {"chosen": slice(0, B), "rejected": slice(B, 2 * B)}
    params = [p for p in policy.parameters()]

    def loss_of(lp):
        with torch.no_grad():
            ref = sequence_logps(reference, ids, prompt)
        return gradlens.preference_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta=0.1).loss

    def plain():
        opt.zero_grad(set_to_none=True)
        loss_of(sequence_logps(policy, ids, prompt)).backward()
        opt.step()

    def recorded():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(sequence_logps(policy, ids, prompt))
        with recorder.capture(groups=groups) as cap:
            loss.backward()
        cap.norm("chosen"), cap.norm("rejected"), cap.cosine("chosen", "rejected"), cap.layer_table()
        opt.step()

    def naive():
        opt.zero_grad(set_to_none=True)
        lp = sequence_logps(policy, ids, prompt)
        (w,) = torch.autograd.grad(loss_of(lp), lp, retain_graph=True)
        gc = torch.autograd.grad(lp[:B], params, w[:B], retain_graph=True)
        gr = torch.autograd.grad(lp[B:], params, w[B:])
        for p, a, b in zip(params, gc, gr):
            p.grad = a + b
        sum(a.pow(2).sum() for a in gc).sqrt(), sum(b.pow(2).sum() for b in gr).sqrt(), sum((a * b).sum() for a, b in zip(gc, gr))
        opt.step()

    variants = {"plain": plain, "recorder": recorded, "naive": naive}
    times = {k: [] for k in variants}
    for i in range(args.warmup + args.steps):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print(f"model: GPT-2 4 layers x 256, vocab {args.vocab}; batch {B} pairs x {T} tokens; {args.steps} steps per variant")
    for k in variants:
        print(f"{k:>9}: median {med[k] * 1e3:8.1f} ms   ratio to plain {med[k] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
