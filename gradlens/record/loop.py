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

from ..gradients.recorder import GradientRecorder
from ..losses import PreferenceLossOutput, preference_loss
from ..pairs import pair_groups, row_sides, split_pairs
from ..runs import schema
from ..runs.preference_log import PreferenceRunLog
from ..runs.step_row import layer_rows, pair_columns, step_row
from . import checkpoint as ckpt
from . import resume as R
from .config import RecordConfig, to_dict
from .data import FINGERPRINT_KEY, data_fingerprints
from .distributed import DistContext, ShardedCheckpoints
from .envs import PreferenceEnv
from .progress import Progress
from .resume import ResumePoint

STEP_COLUMNS = schema.PREFERENCE_STEP_COLUMNS
REFERENCE_CHUNK = 16  # pairs per reference forward; fixed so cached values never depend on access order
STATUS_COMPLETE = schema.STATUS_COMPLETE
STATUS_NONFINITE = schema.STATUS_NONFINITE


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
    if device.type == "meta":
        raise ValueError("--device meta holds no data, so nothing can be trained on it; use cpu, cuda or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:  # mps, xpu, hpu, lazy ... construct as devices on any machine: only a tensor shows they work
        torch.empty(1, device=device)
    except Exception as exc:  # noqa: BLE001 - NotImplementedError, AssertionError, ModuleNotFoundError, RuntimeError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ValueError(f"--device {name}: not usable on this machine ({reason}); use --device cpu"
                         + (" or cuda" if torch.cuda.is_available() else "")) from None
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
        chosen, rejected = split_pairs(logps)
        for idx, c, r in zip(indices, chosen.tolist(), rejected.tolist()):
            self.cache[idx] = (c, r)

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


class _NoLog:
    """What ranks other than 0 write under torchrun: nothing."""

    def log_step(self, row: dict, **kwargs) -> dict:
        return row

    def log_rows(self, step: int, rows: list) -> None:
        pass

    def log_eval(self, row: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class StepContext:
    """Everything one optimizer step needs besides its number; built once per run."""

    cfg: RecordConfig
    policy: nn.Module  # DDP-wrapped under torchrun; the recorder hooks the module inside
    env: PreferenceEnv
    recorder: GradientRecorder
    reference_logps: ReferenceLogps
    order: PairOrder
    optimizer: torch.optim.Optimizer
    device: torch.device
    dist: DistContext = DistContext()


@dataclass
class StepOutput:
    """One finished step: its steps.csv row, and what else the run log takes from it."""

    row: dict[str, Any]
    layers: dict | None  # the layer table, on steps that log one
    rows: list[dict] | None  # --per-row: rows.csv rows
    unattributed: dict[str, float]


def check_compatible(cfg: RecordConfig, env: PreferenceEnv, ctx: DistContext = DistContext()) -> None:
    """Problems that only show once the data is loaded; raised before anything is written."""
    if cfg.batch_size > env.num_pairs():
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {env.num_pairs()} usable training pairs")
    if ctx.world > 1 and cfg.batch_size < ctx.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is smaller than the {ctx.world} processes; each needs at least one pair")
    if cfg.fsdp and ctx.world == 1:
        raise ValueError("--fsdp shards the model over torchrun processes: run it as torchrun --nproc_per_node N -m gradlens record ...")
    if ctx.world > 1 and cfg.per_row:
        raise ValueError("--per-row is recorded in single-process runs only (per-row norms are per rank under torchrun)")
    if ctx.world > 1 and cfg.loss_spec.method.rebalance is not None:
        raise ValueError(f"--loss {cfg.loss} rewrites the gradient from the recorded pieces; it runs in single-process runs only")


def record_run(
    cfg: RecordConfig,
    run_dir: Path,
    env: PreferenceEnv,
    *,
    resume: "bool | ResumePoint | None" = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    dist: DistContext = DistContext(),
    tensorboard: bool = True,
) -> RunResult:
    """Train one run into ``run_dir`` (already prepared by the caller).

    ``resume``: a ``ResumePoint`` from ``resume.plan_resume`` (or True to plan it
    here) continues the run from its last checkpoint. Under torchrun every rank
    calls this; only rank 0 (``dist.is_main``) writes.
    """
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
    sharded = cfg.fsdp and dist.world > 1  # --fsdp: FSDP2 replaces the parameters, so before the optimizer
    if sharded:
        checkpoints = ShardedCheckpoints(policy, dist)
        dist.fully_shard(policy)
    optimizer = build_optimizer(cfg, policy.parameters())

    point = R.plan_resume(run_dir, cfg, R.saved_config(run_dir)) if resume is True else (resume or None)
    resume = point is not None
    if resume and sharded:
        start, state = checkpoints.restore(point, policy, optimizer)
    else:
        start, state = R.restore(point, policy, optimizer, device) if resume else (0, {})
    config = {**to_dict(cfg), "env_info": env.info(), "world_size": dist.world,
              FINGERPRINT_KEY: data_fingerprints({"data": cfg.data, "eval_data": cfg.eval_data})}
    main = dist.is_main
    if main:
        if resume:
            R.begin(run_dir, point, config)  # the first write of a resumed run
        out = PreferenceRunLog(
            run_dir, config, resume_at=start if resume else None, evals=True, per_row=cfg.per_row, tensorboard=tensorboard
        )
    else:
        out = _NoLog()
    if main and env.save_reference and not ckpt.reference_path(run_dir).is_file():
        ckpt.save_reference(run_dir, env.policy)

    bar = Progress(cfg.steps, initial=start, desc=f"{cfg.env} {cfg.loss}", enabled=progress and main)
    say = log or bar.write
    if resume:
        say(f"{run_dir}: resuming from step {start}" + ("" if start else " (no checkpoint yet: starting over)"))
    recorder = GradientRecorder(policy)
    ctx = StepContext(
        cfg=cfg, policy=dist.wrap(policy), env=env, recorder=recorder, reference_logps=ReferenceLogps(env, reference, device),
        order=PairOrder(env.num_pairs(), cfg.batch_size, cfg.seed, cfg.shuffle), optimizer=optimizer, device=device, dist=dist,
    )  # fmt: skip
    nonfinite_steps = int(state.get("nonfinite_steps", 0))
    previous_wall = float(state.get("wall_time_s", 0.0))
    status, message, step = STATUS_COMPLETE, "", start

    def evaluate(at: int) -> None:
        if main or sharded:  # a sharded forward needs every rank; rank 0 logs
            out.log_eval({schema.STEP: at, **env.evaluate(policy, reference, beta=cfg.beta, device=device)})

    def elapsed() -> float:
        return previous_wall + time.perf_counter() - t0

    try:
        for step in range(start, cfg.steps):
            if step == 0 or (cfg.eval_every and step % cfg.eval_every == 0):
                evaluate(step)
            done_step = _train_step(ctx, step)
            row = out.log_step(done_step.row, layers=done_step.layers, unattributed=done_step.unattributed)
            if done_step.rows is not None:
                out.log_rows(step, done_step.rows)
            bar.step(row[schema.LOSS], row[schema.GRAD_NORM_CHOSEN], row[schema.GRAD_NORM_REJECTED])
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
            if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                saved = {"nonfinite_steps": nonfinite_steps, "wall_time_s": elapsed()}
                if sharded:  # every rank gathers, rank 0 writes
                    checkpoints.save(run_dir, done, policy, optimizer, saved, tokenizer=env.tokenizer)
                elif main:
                    ckpt.save_checkpoint(run_dir, done, policy, optimizer, saved, tokenizer=env.tokenizer)
                out.flush()
        else:
            step = cfg.steps
            evaluate(cfg.steps)
        wall = elapsed()
        steps_done = step + 1 if status == STATUS_NONFINITE else cfg.steps
        out.finish(
            status=status, message=message, steps=cfg.steps, wall_time_s=wall,
            stopped_at_step=step if status == STATUS_NONFINITE else None,
            skipped_steps=nonfinite_steps if cfg.skip_nonfinite else 0, resumed_from_step=start if resume else None,
        )  # fmt: skip
    finally:
        recorder.close()
        bar.close()
        out.close()
    return RunResult(run_dir, status, steps_done, wall, message)


def _train_step(ctx: StepContext, step: int) -> StepOutput:
    """One optimizer step over this rank's shard of the step's pairs (``ctx.policy`` may be DDP-wrapped)."""
    cfg, dist, optimizer = ctx.cfg, ctx.dist, ctx.optimizer
    indices = dist.shard(ctx.order.batch(step))
    chunks = micro_batches(indices, cfg.grad_accum)
    optimizer.zero_grad(set_to_none=True)
    outputs, chosen_logps, rejected_logps = [], [], []
    spec = cfg.loss_spec  # the method and its options, resolved once when the config was validated
    rebalance = spec.method.rebalance
    keep = rebalance is not None  # the parameter-space step rewrites p.grad from the recorded pieces
    with ctx.recorder.capture(
        groups=pair_groups(len(chunks[0])), per_row=cfg.per_row, accumulate=len(chunks) > 1, keep_pieces=keep
    ) as cap:
        for k, chunk in enumerate(chunks):
            b = len(chunk)
            cap.set_groups(pair_groups(b))  # the last micro-batch may be smaller
            with dist.no_sync(ctx.policy, sync=k == len(chunks) - 1):
                logps, lengths = ctx.env.logps(ctx.policy, ctx.env.make_batch(chunk, ctx.device))
                (chosen, rejected), (len_c, len_r) = split_pairs(logps.float()), split_pairs(lengths)
                ref_chosen, ref_rejected = ctx.reference_logps.get(chunk)
                result = preference_loss(
                    chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta, method=spec,
                    chosen_lengths=len_c, rejected_lengths=len_r,
                )  # fmt: skip
                # b·N/B: DDP averages over N ranks, so p.grad is the full-batch mean gradient.
                (result.loss * (b * dist.world / cfg.batch_size)).backward()
            outputs.append(result)
            chosen_logps.append(chosen.detach())
            rejected_logps.append(rejected.detach())
    merged = merge_outputs(gather_outputs(outputs, dist))
    chosen_all, rejected_all = dist.gather([torch.cat(chosen_logps), torch.cat(rejected_logps)])
    row = step_row(
        step, loss=merged.dpo_loss.item(), lr=optimizer.param_groups[0]["lr"], pairs=pair_columns([merged], chosen_all, rejected_all),
        capture=cap, nonfinite=merged.nonfinite,
    )  # fmt: skip
    row = {name: row[name] for name in STEP_COLUMNS}
    nonfinite = bool(row[schema.NONFINITE])
    layers = layer_rows(cap) if step % cfg.layers_every == 0 else None
    rows = _per_row_table(step, chunks, cap.per_row_norms().detach().double().cpu()) if cfg.per_row else None
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)  # never apply a non-finite update
    else:
        if rebalance is not None:  # the logged norms above are DPO's pieces; the update is rebalanced
            rebalance(cap, dict(ctx.recorder.model.named_parameters()), **spec.options)
        optimizer.step()
    return StepOutput(row, layers, rows, dict(cap.unattributed))


def _per_row_table(step: int, chunks: list[list[int]], norms: torch.Tensor) -> list[dict]:
    """rows.csv rows: each row's own gradient norm, mapped back to (pair, side)."""
    expected = 2 * sum(len(c) for c in chunks)
    if norms.numel() != expected:
        raise RuntimeError(f"recorder returned {norms.numel()} per-row norms for {expected} rows")
    table, offset = [], 0
    for chunk in chunks:  # each micro-batch is its own [chosen; rejected] block
        values = norms[offset : offset + 2 * len(chunk)].tolist()
        table.extend(
            {schema.STEP: step, schema.ROW_PAIR: chunk[i], schema.ROW_SIDE: side, schema.ROW_GRAD_NORM: value}
            for (i, side), value in zip(row_sides(len(chunk)), values)
        )
        offset += 2 * len(chunk)
    return table
