"""Recorder overhead: a DPO training step with and without gradlens, side by side.

For each configuration the step variants run interleaved in one process (so
machine noise hits all of them alike), and the table reports median step-time
ratios:

  plain        policy forward on 2B rows, DPO loss, backward, AdamW step
  recorded     the same step inside ``GradientRecorder.capture`` (the default:
               split backward, norms streamed), plus reading the norms, the
               cosine and the per-layer table. The recorder stays attached, as in
               training (its one-off attach time is printed separately); the
               recorded variants run on their own copy of the model, so the plain
               step never runs with hooks attached
  +ref         both again with the reference model's forward included (what a
               DPO trainer does; it dilutes the ratio)
  bit-exact    the recorder with ``split_backward=False`` (p.grad bit-identical)
  naive        chosen and rejected gradients from two separate
               ``torch.autograd.grad`` passes (then summed into .grad)

Peak memory is measured in separate processes, one per variant: on CPU the peak
resident set (``VmHWM``, reset when the child starts, since a child inherits its
parent's high-water mark over exec), ``torch.cuda.max_memory_allocated`` on CUDA.

Precision: each configuration runs in float32, under ``torch.autocast`` (bf16) or with
bf16 weights (no autocast), as its name says; ``--autocast`` applies autocast to the
float32 configurations too. The SmolLM2-135M configuration has that model's shape
(Llama 30 x 576, GQA 9/3, SwiGLU 1536, tied embedding, vocabulary 49152), randomly
initialised: nothing is downloaded.

The FSDP2 configuration runs ``torchrun`` with 2 processes on gloo (``fully_shard`` on
every block and the root); the recorder stays attached across steps there (creating it
makes a process group), and each rank's peak memory is measured in separate launches.

The per-row configuration compares per-row gradient norms (``per_row=True``)
with Opacus 1.6 on a model Opacus supports (embedding, MLP, LayerNorm, head):
``GradSampleModule`` (per-sample gradients, then norms) and ghost clipping
(``GradSampleModuleFastGradientClipping``, per-sample norms only). Its plain
step is a forward and backward (no optimizer), as in Opacus's own use.

Usage:
  python benchmarks/recorder_overhead.py                      # every configuration
  python benchmarks/recorder_overhead.py --configs gpt2-4x256,per-row --steps 10
  python benchmarks/recorder_overhead.py --smoke              # tiny models, seconds
  python benchmarks/recorder_overhead.py --device cuda --autocast bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import gradlens  # noqa: E402


@dataclass(frozen=True)
class Config:
    name: str
    family: str  # gpt2 | llama | mlp
    layers: int
    width: int
    vocab: int
    pairs: int  # B: the batch has 2B rows (or N = 2B rows for per-row)
    seq: int
    micro_batches: int = 1
    heads: int = 4
    kv_heads: int = 4
    precision: str = "fp32"  # fp32 | autocast-bf16 | bf16-weights
    intermediate: int = 0  # Llama's MLP width (0: about 8/3 of the width)
    tied: bool = False  # Llama: lm_head shares the embedding
    fsdp: bool = False  # 2 processes, fully_shard (Llama only)


_GPT2 = dict(family="gpt2", layers=4, width=256, vocab=50257, pairs=8, seq=64, heads=4)
_LLAMA = dict(family="llama", layers=8, width=512, vocab=32000, pairs=4, seq=128, heads=8, kv_heads=2)
_SMOLLM2 = dict(family="llama", layers=30, width=576, vocab=49152, pairs=4, seq=64, heads=9, kv_heads=3, intermediate=1536, tied=True)
_SMOKE_GPT2 = dict(family="gpt2", layers=2, width=32, vocab=300, pairs=2, seq=16, heads=2)
_SMOKE_LLAMA = dict(family="llama", layers=2, width=32, vocab=300, pairs=2, seq=16, heads=4, kv_heads=2)
_SMOKE_SMOLLM2 = dict(family="llama", layers=2, width=36, vocab=300, pairs=2, seq=16, heads=3, kv_heads=1, intermediate=96, tied=True)

CONFIGS = {
    "gpt2-4x256": Config("GPT-2 4 x 256, vocab 50257, B = 8, T = 64", **_GPT2),
    "gpt2-4x256-autocast": Config("the same under bf16 autocast", **_GPT2, precision="autocast-bf16"),
    "gpt2-4x256-bf16": Config("the same with bf16 weights", **_GPT2, precision="bf16-weights"),
    "gpt2-124m": Config("GPT-2 12 x 768 (124M), vocab 50257, B = 2, T = 64", "gpt2", 12, 768, 50257, 2, 64, heads=12),
    "llama-8x512": Config("Llama 8 x 512, GQA 8/2, vocab 32000, B = 4, T = 128", **_LLAMA),
    "llama-8x512-autocast": Config("the same under bf16 autocast", **_LLAMA, precision="autocast-bf16"),
    "llama-8x512-bf16": Config("the same with bf16 weights", **_LLAMA, precision="bf16-weights"),
    "llama-8x512-accum4": Config("Llama 8 x 512, 4 micro-batches of 1 pair", **_LLAMA, micro_batches=4),
    "smollm2-135m": Config("SmolLM2-135M's shape: Llama 30 x 576, GQA 9/3, SwiGLU 1536, tied, vocab 49152, B = 4, T = 64", **_SMOLLM2),
    "smollm2-135m-autocast": Config("the same under bf16 autocast", **_SMOLLM2, precision="autocast-bf16"),
    "fsdp2-llama": Config("FSDP2, 2 processes on gloo: Llama 4 x 256, GQA 4/2, vocab 8000, B = 2 per rank, T = 64",
                          "llama", 4, 256, 8000, 2, 64, heads=4, kv_heads=2, fsdp=True),
    "per-row": Config("per-row norms: embedding+MLP+LayerNorm+head, V = 2000, D = 256, T = 64, N = 16", "mlp", 1, 256, 2000, 8, 64),
}
SMOKE = {
    "gpt2-4x256": Config("smoke GPT-2 2 x 32", **_SMOKE_GPT2),
    "gpt2-4x256-autocast": Config("smoke GPT-2, bf16 autocast", **_SMOKE_GPT2, precision="autocast-bf16"),
    "gpt2-4x256-bf16": Config("smoke GPT-2, bf16 weights", **_SMOKE_GPT2, precision="bf16-weights"),
    "llama-8x512": Config("smoke Llama 2 x 32 GQA", **_SMOKE_LLAMA),
    "llama-8x512-autocast": Config("smoke Llama, bf16 autocast", **_SMOKE_LLAMA, precision="autocast-bf16"),
    "llama-8x512-bf16": Config("smoke Llama, bf16 weights", **_SMOKE_LLAMA, precision="bf16-weights"),
    "llama-8x512-accum4": Config("smoke Llama, 2 micro-batches", **_SMOKE_LLAMA, micro_batches=2),
    "smollm2-135m": Config("smoke SmolLM2 shape 2 x 36, GQA 3/1, tied", **_SMOKE_SMOLLM2),
    "smollm2-135m-autocast": Config("smoke SmolLM2 shape, bf16 autocast", **_SMOKE_SMOLLM2, precision="autocast-bf16"),
    "fsdp2-llama": Config("smoke FSDP2 Llama 2 x 32", **_SMOKE_LLAMA, fsdp=True),
    "per-row": Config("smoke per-row", "mlp", 1, 32, 200, 4, 16),
}
DEFAULT_CONFIGS = [
    "gpt2-4x256", "gpt2-4x256-autocast", "gpt2-4x256-bf16", "gpt2-124m", "llama-8x512", "llama-8x512-autocast",
    "llama-8x512-bf16", "llama-8x512-accum4", "smollm2-135m", "smollm2-135m-autocast", "fsdp2-llama", "per-row",
]
TARGETS = {"time": 1.05, "memory": 1.10, "per-row": 1.25}


# ---- models --------------------------------------------------------------------------------


class MlpLM(nn.Module):
    """Embedding -> MLP -> LayerNorm -> head: layers Opacus supports, rows independent."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(self.norm(x + self.down(F.gelu(self.up(x)))))


def build_model(cfg: Config) -> nn.Module:
    if cfg.family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        c = GPT2Config(vocab_size=cfg.vocab, n_positions=cfg.seq, n_embd=cfg.width, n_layer=cfg.layers, n_head=cfg.heads,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(c)
    if cfg.family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        mlp = cfg.intermediate or int(cfg.width * 8 / 3) // 64 * 64 or 64
        c = LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.width, intermediate_size=mlp,
                        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                        max_position_embeddings=cfg.seq, tie_word_embeddings=cfg.tied)
        return LlamaForCausalLM(c)
    return MlpLM(cfg.vocab, cfg.width)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def sequence_logps(model: nn.Module, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    logp = F.log_softmax(logits_of(model, ids)[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp[:, prompt_len - 1 :].sum(-1)


# ---- one configuration's step variants -----------------------------------------------------


class DpoBench:
    """A policy, its frozen reference, AdamW, a fixed batch; ``variants()`` are the step functions."""

    def __init__(self, cfg: Config, device: str, autocast: str | None, *, copies: bool = True):
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.copies = copies  # False (one variant per process, for memory): record on the policy itself
        self._attached: dict[str, tuple] = {}  # recorder options -> (policy, optimizer, recorder)
        self.attach_seconds: dict[str, float] = {}
        self.policy = build_model(cfg).to(device).train()
        if cfg.precision == "bf16-weights":
            self.policy = self.policy.to(torch.bfloat16)
        if cfg.precision == "autocast-bf16":
            autocast = "bf16"
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=1e-5)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.ids = torch.randint(0, cfg.vocab, (2 * cfg.pairs, cfg.seq), device=device)
        self.prompt = cfg.seq // 4
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast or "")
        self.autocast = (lambda: torch.autocast(device.split(":")[0], dtype=dtype)) if dtype else None

    def _forward(self, model, ids):
        if self.autocast is None:
            return sequence_logps(model, ids, self.prompt)
        with self.autocast():
            return sequence_logps(model, ids, self.prompt)

    def _chunks(self):
        """Micro-batches as (ids, pairs): pair k is rows k and B + k of the full batch."""
        b, m = self.cfg.pairs, self.cfg.micro_batches
        size = b // m
        for k in range(m):
            rows = list(range(k * size, (k + 1) * size)) + list(range(b + k * size, b + (k + 1) * size))
            yield self.ids[rows], size

    def _loss(self, lp, ids, b, with_ref):
        if with_ref:
            with torch.no_grad():
                ref = self._forward(self.reference, ids)
        else:
            ref = torch.zeros_like(lp)  # a constant reference: the policy's work is the same
        return gradlens.preference_loss(lp[:b], lp[b:], ref[:b], ref[b:], beta=0.1).loss / self.cfg.micro_batches

    def plain(self, with_ref=False):
        self.opt.zero_grad(set_to_none=True)
        for ids, b in self._chunks():
            self._loss(self._forward(self.policy, ids), ids, b, with_ref).backward()
        self.opt.step()

    def _recorder(self, **recorder_options):
        """(policy, optimizer, recorder) for these options: attached once, on a copy of the policy."""
        key = json.dumps(recorder_options, sort_keys=True)
        if key not in self._attached:
            policy, opt = self.policy, self.opt
            if self.copies:
                policy = copy.deepcopy(self.policy)
                opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
            t0 = time.perf_counter()
            self._attached[key] = (policy, opt, gradlens.GradientRecorder(policy, **recorder_options))
            self.attach_seconds[key] = time.perf_counter() - t0
        return self._attached[key]

    def recorded(self, with_ref=False, **recorder_options):
        policy, opt, rec = self._recorder(**recorder_options)
        opt.zero_grad(set_to_none=True)
        b = self.cfg.pairs // self.cfg.micro_batches
        groups = {"chosen": slice(0, b), "rejected": slice(b, 2 * b)}
        with rec.capture(groups=groups, accumulate=self.cfg.micro_batches > 1) as cap:
            for ids, b in self._chunks():
                self._loss(self._forward(policy, ids), ids, b, with_ref).backward()
        cap.norm("chosen"), cap.norm("rejected"), cap.cosine("chosen", "rejected"), cap.layer_table()
        opt.step()

    def naive(self):
        self.opt.zero_grad(set_to_none=True)
        for ids, b in self._chunks():
            lp = self._forward(self.policy, ids)
            (w,) = torch.autograd.grad(self._loss(lp, ids, b, False), lp, retain_graph=True)
            gc = torch.autograd.grad(lp[:b], self.params, w[:b], retain_graph=True)
            gr = torch.autograd.grad(lp[b:], self.params, w[b:])
            for p, a, r in zip(self.params, gc, gr):
                p.grad = a + r if p.grad is None else p.grad + a + r
        # (norms of the last micro-batch's pieces only: accumulation would need buffers here too)
        [a.pow(2).sum() for a in gc], [r.pow(2).sum() for r in gr], [(a * r).sum() for a, r in zip(gc, gr)]
        self.opt.step()

    def variants(self) -> dict[str, Callable[[], None]]:
        return {
            "plain": self.plain,
            "recorded": self.recorded,
            "plain+ref": lambda: self.plain(with_ref=True),
            "recorded+ref": lambda: self.recorded(with_ref=True),
            "bit-exact": lambda: self.recorded(split_backward=False),
            "naive": self.naive,
        }


class PerRowBench:
    """Per-row gradient norms: gradlens ``per_row=True`` against Opacus, forward + backward only."""

    def __init__(self, cfg: Config, device: str, autocast: str | None, *, copies: bool = True):
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = build_model(cfg).to(device).train()
        self.copies = copies
        self._attached = None  # (model copy, recorder), attached once
        self.attach_seconds: dict[str, float] = {}
        self.n = 2 * cfg.pairs
        self.ids = torch.randint(0, cfg.vocab, (self.n, cfg.seq), device=device)
        self.groups = {"chosen": slice(0, cfg.pairs), "rejected": slice(cfg.pairs, self.n)}
        self._opacus: dict[str, nn.Module] = {}

    def _loss(self, model):
        logits = model(self.ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, self.cfg.vocab), self.ids[:, 1:].reshape(-1), reduction="sum")

    def plain(self):
        self.model.zero_grad(set_to_none=True)
        self._loss(self.model).backward()

    def gradlens(self) -> torch.Tensor:
        if self._attached is None:
            model = copy.deepcopy(self.model) if self.copies else self.model
            t0 = time.perf_counter()
            self._attached = (model, gradlens.GradientRecorder(model))
            self.attach_seconds["{}"] = time.perf_counter() - t0
        model, rec = self._attached
        model.zero_grad(set_to_none=True)
        with rec.capture(groups=self.groups, per_row=True) as cap:
            self._loss(model).backward()
        return cap.per_row_norms()

    def opacus(self, kind: str) -> torch.Tensor:
        from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

        module = self._opacus.get(kind)
        if module is None:
            inner = copy.deepcopy(self.model)
            if kind == "ghost":
                module = GradSampleModuleFastGradientClipping(inner, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True)
            else:
                module = GradSampleModule(inner, loss_reduction="sum")
            self._opacus[kind] = module
        module.zero_grad(set_to_none=True)
        self._loss(module).backward()
        if kind == "ghost":
            return module.get_norm_sample()
        per_param = [p.grad_sample.reshape(self.n, -1).pow(2).sum(1) for p in module.parameters() if p.requires_grad]
        for p in module.parameters():
            p.grad_sample = None
        return torch.stack(per_param).sum(0).sqrt()

    def variants(self) -> dict[str, Callable[[], None]]:
        return {
            "plain": self.plain,
            "recorded": self.gradlens,
            "opacus-gsm": lambda: self.opacus("gsm"),
            "opacus-ghost": lambda: self.opacus("ghost"),
        }

    def check_agreement(self) -> float:
        """Largest relative difference between gradlens's and Opacus's per-row norms (all exact)."""
        ours = self.gradlens().double()
        worst = 0.0
        for kind in ("gsm", "ghost"):
            theirs = self.opacus(kind).double().to(ours.device)
            worst = max(worst, float(((ours - theirs).abs() / theirs.abs()).max()))
        return worst


def make_bench(cfg: Config, device: str, autocast: str | None, *, copies: bool = True):
    kind = PerRowBench if cfg.family == "mlp" else DpoBench
    return kind(cfg, device, autocast, copies=copies)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(bench, steps: int, warmup: int, device: str, only: str | None = None, clock: str = "wall") -> dict[str, float]:
    """Median seconds per step of every variant, interleaved step by step.

    ``clock="cpu"``: this process's CPU time instead of wall time. On a machine shared
    with other jobs, wall time also counts the time this process waited for a core;
    with one thread, CPU time counts only its own work (memory-bandwidth contention
    still shows). CUDA always uses wall time."""
    now = time.perf_counter if clock == "wall" or device.startswith("cuda") else time.process_time
    variants = bench.variants()
    if only:
        keep = {"plain", "recorded", *only.split(",")}
        variants = {k: v for k, v in variants.items() if k in keep}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(warmup + steps):
        for name, fn in variants.items():
            sync(device)
            t0 = now()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(now() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- peak memory, one process per variant --------------------------------------------------


def reset_peak_rss() -> None:
    """Linux: forget the resident-set high-water mark this process started with.

    A child started by fork and exec keeps its parent's high-water mark (the kernel
    carries it over exec into ``ru_maxrss``), so without this every memory child would
    report at least the size of the benchmark's parent process, which holds the timed
    models. Writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """The peak resident set since ``reset_peak_rss`` (``VmHWM``); ``ru_maxrss`` where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory_child(config_key: str, variant: str, steps: int, device: str, autocast: str | None, smoke: bool) -> None:
    reset_peak_rss()
    import gradlens.gradients  # noqa: F401  (every variant pays the library's import, so the ratio is the steps')

    cfg = (SMOKE if smoke else CONFIGS)[config_key]
    bench = make_bench(cfg, device, autocast, copies=False)  # one model in this process, as in training
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    fn = bench.variants()[variant]
    for _ in range(steps):
        fn()
    sync(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak}))


def peak_memory(config_key: str, variant: str, args) -> float:
    cmd = [sys.executable, __file__, "--child", config_key, variant, "--steps", str(args.memory_steps),
           "--device", args.device, "--threads", str(args.threads)]
    if args.autocast:
        cmd += ["--autocast", args.autocast]
    if args.smoke:
        cmd.append("--smoke")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


# ---- FSDP2: two processes under torchrun ----------------------------------------------------


def fsdp_child(config_key: str, out: str, variants: str, args) -> None:
    """One rank of the FSDP2 benchmark: time (or run, for memory) the variants, rank 0 writes ``out``."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    reset_peak_rss()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = (SMOKE if args.smoke else CONFIGS)[config_key]
    torch.manual_seed(0)
    model = build_model(cfg).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg.vocab, (2 * cfg.pairs, cfg.seq), generator=g)
    b, prompt = cfg.pairs, cfg.seq // 4
    groups = {"chosen": slice(0, b), "rejected": slice(b, 2 * b)}
    recorder = gradlens.GradientRecorder(model) if "recorded" in variants else None  # stays attached

    def loss():
        lp = sequence_logps(model, ids, prompt)
        return gradlens.preference_loss(lp[:b], lp[b:], torch.zeros(b), torch.zeros(b), beta=0.1).loss

    def plain():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()

    def recorded():
        opt.zero_grad(set_to_none=True)
        with recorder.capture(groups=groups) as cap:
            loss().backward()
        cap.norm("chosen"), cap.norm("rejected"), cap.cosine("chosen", "rejected"), cap.layer_table()
        opt.step()

    fns = {"plain": plain, "recorded": recorded}
    chosen = [v for v in variants.split(",") if v]
    times: dict[str, list[float]] = {k: [] for k in chosen}
    for i in range(args.warmup + args.steps):
        for name in chosen:
            dist.barrier()
            t0 = time.perf_counter()
            fns[name]()
            dist.barrier()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    peak = peak_rss_bytes()
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        Path(out).write_text(json.dumps({"median": {k: statistics.median(v) for k, v in times.items()}, "peak_bytes": max(peaks)}))
    if recorder is not None:
        recorder.close()
    dist.barrier()  # no rank tears down its groups while another still uses them
    dist.destroy_process_group()


def torchrun(config_key: str, variants: str, args) -> dict:
    import socket
    import tempfile

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), __file__,
               "--fsdp-child", config_key, str(out), variants, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", "1"] + (["--smoke"] if args.smoke else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed for {config_key}:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def run_fsdp(key: str, args, *, memory: bool) -> list[str]:
    cfg = (SMOKE if args.smoke else CONFIGS)[key]
    memory_cell = "not measured in this run"
    if memory:  # one launch per variant; the peak of the larger rank
        mem_plain, mem_rec = torchrun(key, "plain", args)["peak_bytes"], torchrun(key, "recorded", args)["peak_bytes"]
        memory_cell = f"{mem_rec / mem_plain:.3f}x ({mem_plain / 2**20:.0f} -> {mem_rec / 2**20:.0f} MiB per rank)"
    med = torchrun(key, "plain,recorded", args)["median"]
    return [f"| {cfg.name} | {med['recorded'] / med['plain']:.3f}x | {memory_cell} | plain {med['plain'] * 1e3:.0f} ms (1 thread per rank) |"]


# ---- the table -----------------------------------------------------------------------------


def machine(args) -> str:
    if args.device.startswith("cuda"):
        what = torch.cuda.get_device_name()
    else:
        what = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{what}; torch {torch.__version__}; {args.device} {args.autocast or 'fp32'}; load average {load:.1f} at start"


def run_config(key: str, args, *, memory: bool = True) -> list[str]:
    cfg = (SMOKE if args.smoke else CONFIGS)[key]
    if cfg.fsdp:
        return run_fsdp(key, args, memory=memory)
    memory_cell = "not measured in this run"
    if memory:
        mem_plain, mem_rec = peak_memory(key, "plain", args), peak_memory(key, "recorded", args)
        memory_cell = f"{mem_rec / mem_plain:.3f}x ({mem_plain / 2**20:.0f} -> {mem_rec / 2**20:.0f} MiB)"
    if args.memory_only:
        return [f"| {cfg.name} | not timed | {memory_cell} | |"]
    bench = make_bench(cfg, args.device, args.autocast)
    med = time_variants(bench, args.steps, args.warmup, args.device, args.variants, args.clock)
    base = med["plain"]
    cells = [f"{k} {med[k] / base:.3f}" for k in med if k not in ("plain", "plain+ref", "recorded+ref")]
    if "recorded+ref" in med:
        cells.insert(1, f"recorded+ref/plain+ref {med['recorded+ref'] / med['plain+ref']:.3f}")
    attach = bench.attach_seconds.get("{}")
    if attach is not None:
        cells.append(f"attach {attach * 1e3:.0f} ms once")
    rows = [
        f"| {cfg.name} | {med['recorded'] / base:.3f}x | {memory_cell} | plain {base * 1e3:.0f} ms; " + "; ".join(cells) + " |"
    ]
    if isinstance(bench, PerRowBench):
        rows.append(f"|   (per-row norms agree with Opacus to {bench.check_agreement():.1e} relative) | | | |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--memory-steps", type=int, default=3, help="steps per memory process")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the step variants (plain is always run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", choices=["bf16", "fp16"], default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (a shared machine, 1 thread)")
    ap.add_argument("--no-memory", action="store_true", help="time only (memory measured in another run)")
    ap.add_argument("--memory-only", action="store_true", help="peak memory only (for configurations too slow to time here)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, 2 steps: checks the benchmark runs")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument("--fsdp-child", nargs=3, metavar=("CONFIG", "OUT", "VARIANTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fsdp_child:
        fsdp_child(*args.fsdp_child, args)
        return
    if args.child:
        peak_memory_child(args.child[0], args.child[1], args.memory_steps, args.device, args.autocast, args.smoke)
        return
    if args.smoke:
        args.steps, args.warmup, args.memory_steps = 1, 0, 1
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    table = SMOKE if args.smoke else CONFIGS
    unknown = [k for k in keys if k not in table]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; choose from {', '.join(table)}")
    print(f"machine: {machine(args)}")
    print(f"median {args.clock} time of {args.steps} interleaved steps per variant (after {args.warmup} warm-up); "
          f"peak memory: {'max_memory_allocated' if args.device.startswith('cuda') else 'VmHWM'}, one process per variant")
    print(f"targets: time <= {TARGETS['time']}x, memory <= {TARGETS['memory']}x, per-row <= {TARGETS['per-row']}x")
    print("| configuration | time ratio | peak memory ratio | other variants (time / plain) |")
    print("|---|---|---|---|")
    for i, key in enumerate(keys):
        for row in run_config(key, args, memory=not args.no_memory and (not args.smoke or i == 0)):  # smoke: one memory pair only
            print(row, flush=True)


if __name__ == "__main__":
    main()
