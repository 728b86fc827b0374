"""The recording loop: optimizer steps with the gradient recorder on every step.

One optimizer step takes ``batch_size`` pairs, split into ``grad_accum``
micro-batches of ceil(batch_size / grad_accum) pairs (the last may be smaller).
Each micro-batch is one forward over its 2b rows [chosen; rejected]; its loss is
scaled by b / batch_size so the summed gradient equals the full-batch mean
gradient. One recorder capture spans all micro-batches, with ``set_groups``
before each, so the chosen/rejected split is that of the whole step.

Row ``step = s`` is computed at the parameters before update s (as TRL logs).
An evaluation row ``step = s`` is taken after s updates; evaluations run at
s = 0, every ``eval_every`` steps and after the last step. Checkpoint
``step_N`` holds the state after N updates; ``--resume`` reloads the last one,
drops every logged row with step >= N, and continues from step N, so the step
sequence has neither gaps nor duplicates. Training is deterministic on CPU:
data order comes from a generator seeded per epoch, evaluations re-seed their
own generator, and dropout is disabled (as TRL does for DPO).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..losses import PreferenceLossOutput, preference_loss
from ..runs import RunWriter, schema, write_json_atomic
from ..runs.tables import CsvTable
from ..runs.tensorboard import PREFERENCE_LAYOUT, REWEIGHTING_LAYOUT, TensorBoardLogger
from . import checkpoint as ckpt
from .config import RecordConfig, to_dict
from .distributed import DistContext
from .envs import PreferenceEnv
from .progress import Progress

STEP_COLUMNS = schema.PREFERENCE_STEP_COLUMNS
# --per-row: one row per (step, pair, side) with that row's own gradient norm.
ROWS_FILE = "rows.csv"
ROW_COLUMNS = (schema.STEP, "pair", "side", "grad_norm")
REFERENCE_CHUNK = 16  # pairs per reference forward; fixed so cached values never depend on access order

# The shared chosen-vs-rejected dashboard plus the reweighting and evaluation charts.
RECORD_LAYOUT = PREFERENCE_LAYOUT + REWEIGHTING_LAYOUT + [
    (
        "gradlens: evaluation",
        [
            ("true reward of samples", ["^eval/true_reward$"]),
            ("KL to the reference / to the optimum", ["^eval/kl_to_ref$", "^eval/kl_to_optimum$"]),
            ("held-out log-probs: chosen vs rejected", ["^eval/logps/chosen$", "^eval/logps/rejected$"]),
            ("held-out preference accuracy", ["^eval/pref_accuracy$"]),
            ("probability mass on responses in no pair (tabular)", ["^eval/ood_mass$"]),
        ],
    ),
]

STATUS_COMPLETE = "complete"
STATUS_NONFINITE = "nonfinite"


@dataclass
class RunResult:
    path: Path
    status: str
    steps_done: int
    wall_time_s: float
    message: str = ""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def build_optimizer(cfg: RecordConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr)


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class PairOrder:
    """Batches as consecutive slices of an endless stream of epochs.

    Epoch e is a permutation seeded by (seed, e) -- or the file order with
    ``--no-shuffle`` -- so step s's batch depends on s alone, which is what makes
    a resumed run see the same data as an uninterrupted one.
    """

    def __init__(self, num_pairs: int, batch_size: int, seed: int, shuffle: bool):
        self.n, self.batch_size, self.seed, self.shuffle = num_pairs, batch_size, seed, shuffle
        self._epoch, self._order = -1, []

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.n, generator=gen).tolist()
            else:
                self._order = list(range(self.n))
            self._epoch = epoch
        return self._order

    def batch(self, step: int) -> list[int]:
        out = []
        for position in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, offset = divmod(position, self.n)
            out.append(self._order_of(epoch)[offset])
        return out


class ReferenceLogps:
    """ℓ_ref of training pairs, computed by the frozen reference on first use."""

    def __init__(self, env: PreferenceEnv, reference: nn.Module, device: torch.device):
        self.env, self.reference, self.device = env, reference, device
        self.cache: dict[int, tuple[float, float]] = {}

    @torch.no_grad()
    def _fill(self, chunk: int) -> None:
        indices = list(range(chunk * REFERENCE_CHUNK, min((chunk + 1) * REFERENCE_CHUNK, self.env.num_pairs())))
        logps, _ = self.env.logps(self.reference, self.env.make_batch(indices, self.device))
        b = len(indices)
        for i, idx in enumerate(indices):
            self.cache[idx] = (logps[i].item(), logps[b + i].item())

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        for idx in indices:
            if idx not in self.cache:
                self._fill(idx // REFERENCE_CHUNK)
        chosen = torch.tensor([self.cache[i][0] for i in indices], dtype=torch.float32, device=self.device)
        rejected = torch.tensor([self.cache[i][1] for i in indices], dtype=torch.float32, device=self.device)
        return chosen, rejected


def micro_batches(indices: list[int], grad_accum: int) -> list[list[int]]:
    size = math.ceil(len(indices) / grad_accum)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def merge_outputs(outputs: list[PreferenceLossOutput]) -> PreferenceLossOutput:
    """Per-pair diagnostics of all micro-batches as one full-batch output."""
    cat = lambda name: torch.cat([getattr(o, name) for o in outputs])  # noqa: E731
    u = cat("u")
    dpo_loss = -torch.nn.functional.logsigmoid(u).mean()
    return PreferenceLossOutput(
        loss=dpo_loss, dpo_loss=dpo_loss, u=u, sigmoid_neg_u=cat("sigmoid_neg_u"),
        weight_chosen=cat("weight_chosen"), weight_rejected=cat("weight_rejected"),
        beta_chosen=cat("beta_chosen"), beta_rejected=cat("beta_rejected"),
        chosen_rewards=cat("chosen_rewards"), rejected_rewards=cat("rejected_rewards"),
        margins=cat("margins"), log_pw_over_pl=cat("log_pw_over_pl"),
        nonfinite=any(o.nonfinite for o in outputs) or not bool(torch.isfinite(dpo_loss)),
    )


PER_PAIR_FIELDS = (
    "u", "sigmoid_neg_u", "weight_chosen", "weight_rejected", "beta_chosen", "beta_rejected",
    "chosen_rewards", "rejected_rewards", "margins", "log_pw_over_pl",
)


def gather_outputs(outputs: list[PreferenceLossOutput], dist: DistContext) -> list[PreferenceLossOutput]:
    """Under torchrun, every rank's per-pair diagnostics, in pair order; unchanged otherwise."""
    if dist.world == 1:
        return outputs
    local = [torch.cat([getattr(o, name) for o in outputs]) for name in PER_PAIR_FIELDS]
    fields = dict(zip(PER_PAIR_FIELDS, dist.gather(local)))
    nonfinite = any(o.nonfinite for o in outputs)
    # merge_outputs recomputes the loss from u; only the per-pair fields matter here.
    return [PreferenceLossOutput(loss=fields["u"], dpo_loss=fields["u"], nonfinite=nonfinite, **fields)]


class RunOutputs:
    """Owns one run's outputs: CSV tables, TensorBoard and the per-row table."""

    def __init__(self, run_dir: Path, config: dict, *, resume: bool, start: int, per_row: bool):
        self.writer = RunWriter(run_dir, config, kind=schema.KIND_PREFERENCE, resume=resume)
        self.rows = CsvTable(run_dir / ROWS_FILE, ROW_COLUMNS) if per_row else None
        if resume:
            self.writer.truncate_after(start - 1)
            if self.rows is not None:
                self.rows.keep_steps_upto(start - 1)
        self.tb = TensorBoardLogger(run_dir, RECORD_LAYOUT, purge_step=start if resume else None)

    def log_step(self, step: int, row: dict, layers: dict | None, per_row) -> None:
        self.writer.log_step(row)
        self.tb.scalars(step, row)
        if layers is not None:
            self.writer.log_layers(step, layers)
            self.tb.ratio_histograms(step, layers)
        if per_row is not None:
            _log_per_row(self, step, per_row)

    def log_eval(self, step: int, row: dict) -> None:
        self.writer.log_eval(row)
        self.tb.scalars(step, row)
        self.tb.flush()

    def flush(self) -> None:
        self.tb.flush()

    def write_summary(self, summary: dict) -> None:
        self.writer.write_summary(summary)

    def close(self) -> None:
        self.writer.close()
        if self.rows is not None:
            self.rows.close()
        self.tb.close()


class NoOutputs:
    """What ranks other than 0 write under torchrun: nothing."""

    def log_step(self, step: int, row: dict, layers: dict | None, per_row) -> None:
        pass

    def log_eval(self, step: int, row: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def write_summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _update_config_on_resume(run_dir: Path, config: dict, start: int) -> None:
    """Keep config.json's settings current (e.g. a new --steps) and note the resume."""
    import json

    from ..runs.run_dir import environment_versions

    path = run_dir / schema.CONFIG
    header = json.loads(path.read_text(encoding="utf-8"))
    header["config"] = config
    header.setdefault("resumes", []).append({"from_step": start, "versions": environment_versions()})
    write_json_atomic(path, header)


def check_compatible(cfg: RecordConfig, env: PreferenceEnv, ctx: DistContext = DistContext()) -> None:
    """Problems that only show once the data is loaded; raised before anything is written."""
    if cfg.batch_size > env.num_pairs():
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {env.num_pairs()} usable training pairs")
    if ctx.world > 1 and cfg.batch_size < ctx.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the {ctx.world} processes; each needs at least one pair")
    if ctx.world > 1 and cfg.per_row:
        raise ValueError("--per-row is recorded in single-process runs only (per-row norms are per rank under torchrun)")


def record_run(
    cfg: RecordConfig,
    run_dir: Path,
    env: PreferenceEnv,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    dist: DistContext = DistContext(),
) -> RunResult:
    """Train one run into ``run_dir`` (already prepared by the caller).

    Under torchrun every rank calls this; only rank 0 (``dist.is_main``) writes.
    """
    from .. import GradientRecorder

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]

    policy = copy.deepcopy(env.policy).to(device=device, dtype=dtype)
    reference = copy.deepcopy(env.policy).to(device=device, dtype=dtype)
    for model in (policy, reference):
        disable_dropout(model)
        model.eval()  # no dropout anywhere: gradients are a deterministic function of the batch
    reference.requires_grad_(False)
    optimizer = build_optimizer(cfg, policy.parameters())

    start, state = 0, {}
    if resume:
        found = ckpt.latest_checkpoint(run_dir)
        if found is not None:
            state = ckpt.load_checkpoint(found, policy, optimizer, device)
            start = found.step
    config = {**to_dict(cfg), "env_info": env.info(), "world_size": dist.world}
    main = dist.is_main
    out = RunOutputs(run_dir, config, resume=resume, start=start, per_row=cfg.per_row) if main else NoOutputs()
    if resume and main:
        _update_config_on_resume(run_dir, config, start)
        (run_dir / schema.SUMMARY).unlink(missing_ok=True)
    if main and env.save_reference and not ckpt.reference_path(run_dir).is_file():
        ckpt.save_reference(run_dir, env.policy)

    bar = Progress(cfg.steps, initial=start, desc=f"{cfg.env} {cfg.loss}", enabled=progress and main)
    say = log or bar.write
    if resume:
        say(f"{run_dir}: resuming from step {start}" + ("" if start else " (no checkpoint yet: starting over)"))
    recorder = GradientRecorder(policy)
    trained = dist.wrap(policy)  # DDP under torchrun; the recorder hooks the module inside
    reference_logps = ReferenceLogps(env, reference, device)
    order = PairOrder(env.num_pairs(), cfg.batch_size, cfg.seed, cfg.shuffle)
    nonfinite_steps = int(state.get("nonfinite_steps", 0))
    previous_wall = float(state.get("wall_time_s", 0.0))
    last_row: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    status, message, step = STATUS_COMPLETE, "", start

    def evaluate(at: int) -> None:
        nonlocal last_eval
        if not main:
            return
        row = {schema.STEP: at, **env.evaluate(policy, reference, beta=cfg.beta, device=device)}
        out.log_eval(at, row)
        last_eval = row

    def elapsed() -> float:
        return previous_wall + time.perf_counter() - t0

    try:
        for step in range(start, cfg.steps):
            if step == 0 or (cfg.eval_every and step % cfg.eval_every == 0):
                evaluate(step)
            row, layers, per_row = _train_step(cfg, step, trained, env, recorder, reference_logps, order, optimizer, device, dist)
            out.log_step(step, row, layers, per_row)
            bar.step(row[schema.LOSS], row[schema.GRAD_NORM_CHOSEN], row[schema.GRAD_NORM_REJECTED])
            last_row = row
            if row[schema.NONFINITE]:
                nonfinite_steps += 1
                detail = f"loss={row[schema.LOSS]}, grad_norm={row[schema.GRAD_NORM]}"
                if not cfg.skip_nonfinite:
                    status = STATUS_NONFINITE
                    message = (
                        f"step {step}: the loss or the gradient is not finite ({detail}); the run stopped. "
                        f"The step is logged in {run_dir / schema.STEPS}. Pass --skip-nonfinite to skip such steps "
                        f"(e.g. --resume --skip-nonfinite continues from the last checkpoint)."
                    )
                    break
                say(f"step {step}: non-finite loss or gradient ({detail}); update skipped ({nonfinite_steps} so far)")
            done = step + 1
            if main and (done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
                ckpt.save_checkpoint(run_dir, done, policy, optimizer, {"nonfinite_steps": nonfinite_steps, "wall_time_s": elapsed()})
                out.flush()
        else:
            step = cfg.steps
            evaluate(cfg.steps)
        wall = elapsed()
        steps_done = step + 1 if status == STATUS_NONFINITE else cfg.steps
        out.write_summary({
            "status": status,
            "message": message,
            "steps": cfg.steps,
            "steps_logged": steps_done,
            "stopped_at_step": step if status == STATUS_NONFINITE else None,
            "nonfinite_steps": nonfinite_steps,
            "skipped_steps": nonfinite_steps if cfg.skip_nonfinite else 0,
            "wall_time_s": wall,
            "resumed_from_step": start if resume else None,
            "final": last_row,
            "final_eval": last_eval,
        })
    finally:
        recorder.close()
        bar.close()
        out.close()
    return RunResult(run_dir, status, steps_done, wall, message)


def _train_step(cfg, step, policy, env, recorder, reference_logps, order, optimizer, device, dist=DistContext()):
    """One optimizer step; returns (steps row, layer table or None, per-row norms or None).

    ``policy`` may be DDP-wrapped; this rank trains on its shard of the step's pairs.
    """
    indices = dist.shard(order.batch(step))
    chunks = micro_batches(indices, cfg.grad_accum)
    optimizer.zero_grad(set_to_none=True)
    outputs, chosen_logps, rejected_logps = [], [], []
    first = len(chunks[0])
    groups = {"chosen": slice(0, first), "rejected": slice(first, 2 * first)}
    with recorder.capture(groups=groups, per_row=cfg.per_row, accumulate=len(chunks) > 1) as cap:
        for k, chunk in enumerate(chunks):
            b = len(chunk)
            cap.set_groups({"chosen": slice(0, b), "rejected": slice(b, 2 * b)})
            with dist.no_sync(policy, sync=k == len(chunks) - 1):
                logps, lengths = env.logps(policy, env.make_batch(chunk, device))
                ref_chosen, ref_rejected = reference_logps.get(chunk)
                result = preference_loss(
                    logps[:b].float(), logps[b:].float(), ref_chosen, ref_rejected,
                    beta=cfg.beta, method=cfg.loss, balance_space=cfg.balance_space,
                    chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], adadpo_cap=cfg.adadpo_cap,
                )
                # b·N/B: DDP averages over N ranks, so p.grad is the full-batch mean gradient.
                (result.loss * (b * dist.world / cfg.batch_size)).backward()
            outputs.append(result)
            chosen_logps.append(logps[:b].detach())
            rejected_logps.append(logps[b:].detach())
    merged = merge_outputs(gather_outputs(outputs, dist))
    g, gc, gr = cap.norm(), cap.norm("chosen"), cap.norm("rejected")
    row = {schema.STEP: step, **merged.metrics()}
    chosen_all, rejected_all = dist.gather([torch.cat(chosen_logps), torch.cat(rejected_logps)])
    row[schema.LOGPS_CHOSEN] = chosen_all.double().mean().item()
    row[schema.LOGPS_REJECTED] = rejected_all.double().mean().item()
    row[schema.LR] = optimizer.param_groups[0]["lr"]
    row.update({
        schema.GRAD_NORM: g, schema.GRAD_NORM_CHOSEN: gc, schema.GRAD_NORM_REJECTED: gr,
        schema.GRAD_DOT: cap.dot("chosen", "rejected"), schema.GRAD_COSINE: cap.cosine("chosen", "rejected"),
        schema.GRAD_RATIO: cap.ratio("rejected", "chosen"),
    })
    nonfinite = merged.nonfinite or not all(math.isfinite(v) for v in (g, gc, gr))
    row[schema.NONFINITE] = int(nonfinite)
    row = {name: row[name] for name in STEP_COLUMNS}
    layers = cap.layer_table() if step % cfg.layers_every == 0 else None
    per_row = None
    if cfg.per_row:
        per_row = (chunks, cap.per_row_norms().detach().double().cpu())
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)  # never apply a non-finite update
    else:
        optimizer.step()
    return row, layers, per_row


def _log_per_row(out: RunOutputs, step: int, per_row) -> None:
    """rows.csv: each row's own gradient norm, mapped back to (pair, side)."""
    chunks, norms = per_row
    expected = 2 * sum(len(c) for c in chunks)
    if norms.numel() != expected:
        raise RuntimeError(f"recorder returned {norms.numel()} per-row norms for {expected} rows")
    rows, sides, offset = [], {"chosen": [], "rejected": []}, 0
    for chunk in chunks:  # each micro-batch is [chosen rows; rejected rows]
        b = len(chunk)
        for side, base in (("chosen", offset), ("rejected", offset + b)):
            part = norms[base : base + b]
            sides[side].append(part)
            rows.extend({schema.STEP: step, "pair": pair, "side": side, "grad_norm": value} for pair, value in zip(chunk, part.tolist()))
        offset += 2 * b
    out.rows.append_many(rows)
    for side, parts in sides.items():
        out.tb.writer.add_histogram(f"per_row/grad_norm_{side}", torch.cat(parts).numpy(), step)
