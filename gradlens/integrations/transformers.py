"""gradlens for ``transformers.Trainer``: a callback that writes the run directory,
and the one small mixin that tells it where micro-batches and row groups are.

Batch convention: the collator adds a ``"row_groups"`` entry to each batch, a
mapping from group name to the rows (dim 0 of every model input) in that group,
as a ``slice``, a list of ints or a 1-D index tensor::

    batch["row_groups"] = {"chosen": slice(0, B), "rejected": slice(B, 2 * B)}

The mixin pops it before the model sees the batch. Rows in no group are allowed
(they count in ``grad_norm`` only). Rows must be independent through the model
(no BatchNorm; the batch is dim 0 of every activation).

Why a mixin and not only a callback: the recorder reads the accumulated
``p.grad`` right after the step's last backward, and ``Trainer`` clips the
gradients in place before any callback event fires; only ``training_step`` sits
between the two. The callback alone cannot see the batch either.

    class MyTrainer(GradlensTrainerMixin, Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None): ...

    trainer = MyTrainer(..., callbacks=[GradlensCallback("runs/my-run")])
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import torch
from transformers import TrainerCallback

from ..pairs import CHOSEN, REJECTED, pair_groups
from .run_log import GROUPS_COLUMNS, RunLog, step_metrics, trainer_logs
from .stepper import StepCapture

ROW_GROUPS_KEY = "row_groups"

# Row groups of a ``[chosen; rejected]`` batch of b pairs (TRL's layout): ``pair_row_groups(b)``.
pair_row_groups = pair_groups


class GradlensCallback(TrainerCallback):
    """Records the chosen/rejected gradient split of every optimizer step into a gradlens run directory.

    Needs a trainer with ``GradlensTrainerMixin`` (or ``GradlensDPOTrainer``).
    ``pair`` names the two groups logged as ``grad_norm/chosen`` and
    ``grad_norm/rejected``; other groups get a ``grad_norm/<name>`` column
    (``extra_groups``). ``record_every=k`` records every k-th step (the others
    get NaN gradient columns); ``layers_every`` thins layers.csv.
    ``capture_options`` go to ``GradientRecorder.capture`` (e.g. ``per_row``).
    ``resume=True`` (with ``trainer.train(resume_from_checkpoint=...)``) continues
    an existing run directory from the checkpoint's step; ``overwrite=True`` replaces it.
    Only the main process writes; every process records (the hooks must run on all).
    The split is of the step's accumulated gradient before the trainer clips it.

    On logging steps the Trainer's own logs (``trainer.state.log_history`` and every
    ``report_to`` integration: TensorBoard, W&B, trackio, ...) also get the split of
    the last recorded step (``grad_norm/chosen``, ``grad_norm/rejected``, ``grad/dot``,
    ``grad/cosine``, ``grad/ratio``, ``weights/*`` and the other steps.csv columns), like
    the Trainer's own ``grad_norm``, which is also the last step's. Keys the Trainer
    logs itself (``loss``, ``grad_norm``, ``learning_rate``) keep the Trainer's values.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        config: Optional[Mapping[str, Any]] = None,
        pair: tuple[str, str] = (CHOSEN, REJECTED),
        extra_groups: Sequence[str] = (),
        record_every: int = 1,
        layers_every: int = 1,
        tensorboard: bool = True,
        overwrite: bool = False,
        resume: bool = False,
        capture_options: Optional[Mapping[str, Any]] = None,
    ):
        if record_every < 1 or layers_every < 1:
            raise ValueError(f"record_every and layers_every must be >= 1, got {record_every} and {layers_every}")
        self.run_dir = run_dir
        self.config: dict[str, Any] = {"env": "transformers", "loss": "custom", **dict(config or {})}
        self.columns: Sequence[str] = GROUPS_COLUMNS
        self.pair, self.extra_groups = tuple(pair), tuple(extra_groups)
        self.record_every, self.layers_every = record_every, layers_every
        self.tensorboard, self.overwrite, self.resume = tensorboard, overwrite, resume
        self.capture_options = dict(capture_options or {})
        self.stepper: Optional[StepCapture] = None
        self.log: Optional[RunLog] = None
        self._lr = math.nan
        self._trainer_logs: dict[str, float] = {}  # the last step's row, for the next Trainer log

    # ---- trainer events ----------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("GradlensCallback: the trainer passed no model to on_train_begin")
        if self.stepper is None:  # hooks go on before the first forward
            # With torch_compile, recorded steps run the uncompiled module (GradlensTrainerMixin.training_step)
            # and the hooks come off between them, so unrecorded steps keep the compiled graph.
            self.stepper = StepCapture(uncompiled(model), record_every=self.record_every, capture_options=self.capture_options,
                                       attach_per_step=bool(getattr(args, "torch_compile", False)))  # fmt: skip
        if state.is_world_process_zero and self.log is None:
            self.log = RunLog(
                self.run_dir, self._run_config(args, state), columns=self.columns, pair=self.pair,
                extra_groups=self.extra_groups, layers_every=self.layers_every,
                tensorboard=self.tensorboard, overwrite=self.overwrite,
                resume_at=state.global_step if self.resume else None,
            )  # fmt: skip

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        # The learning rate this update uses (the scheduler steps after the optimizer).
        if optimizer is not None:
            self._lr = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kwargs):
        result = self.stepper.pop() if self.stepper is not None else None
        if result is None:
            if self.stepper is not None and self.stepper.micro_batches_seen == 0:
                raise RuntimeError(
                    "GradlensCallback saw an optimizer step but no micro-batch: the trainer must mix in "
                    "gradlens.integrations.transformers.GradlensTrainerMixin (class MyTrainer(GradlensTrainerMixin, Trainer)) "
                    "or be a gradlens.integrations.trl.GradlensDPOTrainer"
                )
            return
        if self.log is not None:
            row = self.log.write_step(result, lr=self._lr, metrics=step_metrics(result))
            recorded = trainer_logs(row, recorded=result.capture is not None)
            # An unrecorded step keeps the last recorded split (Trainer logs the latest measured values).
            self._trainer_logs = {**self._trainer_logs, **recorded}

    def pop_trainer_logs(self) -> dict[str, float]:
        """What the next training log line gains (``GradlensTrainerMixin.log`` calls this); then cleared."""
        logs, self._trainer_logs = self._trainer_logs, {}
        return logs

    def on_train_end(self, args, state, control, **kwargs):
        if self.log is not None:
            self.log.finish(steps=state.max_steps)
            self.log = None
        if self.stepper is not None:
            self.stepper.close()
            self.stepper = None

    def _run_config(self, args, state) -> dict[str, Any]:
        return {
            "seed": args.seed,
            "learning_rate": args.learning_rate,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_steps": state.max_steps,
            "world_size": args.world_size,
            # transformers 5 calls it activation_checkpointing (the old name is a deprecated alias)
            "gradient_checkpointing": bool(getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", False))),
            "record_every": self.record_every,
            "output_dir": args.output_dir,
            **self.config,
        }


class GradlensTrainerMixin:
    """Put first in the bases: ``class MyTrainer(GradlensTrainerMixin, Trainer)``.

    ``gradlens_dir=`` adds a ``GradlensCallback`` writing there (or pass one in ``callbacks``).
    Without a ``GradlensCallback`` the mixin only pops ``row_groups`` and records nothing.
    """

    def __init__(self, *args, gradlens_dir: str | os.PathLike | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if gradlens_dir is not None:
            self.add_callback(GradlensCallback(gradlens_dir))

    @property
    def gradlens_callback(self) -> Optional[GradlensCallback]:
        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, GradlensCallback)), None)

    def gradlens_row_groups(self, inputs: dict) -> Mapping[str, Any]:
        """This micro-batch's row groups; popped so the model never sees them."""
        if ROW_GROUPS_KEY not in inputs:
            raise ValueError(
                f"the batch has no {ROW_GROUPS_KEY!r} entry (keys: {sorted(inputs)}); gradlens needs the collator to add "
                f"batch[{ROW_GROUPS_KEY!r}] = {{'chosen': slice(0, B), 'rejected': slice(B, 2 * B)}} "
                "(see gradlens.integrations.transformers.pair_row_groups); with the Trainer's default column "
                "filtering, produce it in the collator, not as a dataset column"
            )
        groups = inputs.pop(ROW_GROUPS_KEY)
        if not isinstance(groups, Mapping):
            raise ValueError(f"batch[{ROW_GROUPS_KEY!r}] must map group names to rows, got {type(groups).__name__}")
        return groups

    def gradlens_micro_batch_started(self, stepper: StepCapture) -> None:
        """Called after the capture saw the micro-batch's groups and before its forward."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        groups = self.gradlens_row_groups(inputs)
        callback = self.gradlens_callback
        stepper = callback.stepper if callback is not None else None
        if stepper is None:
            return super().training_step(model, inputs, num_items_in_batch)
        stepper.begin_micro_batch(self.state.global_step, groups, num_rows=_batch_rows(inputs))
        if stepper.recording:  # a recorded step runs the uncompiled module the recorder's hooks are on
            model = uncompiled(model)
        self._gradlens_stepper = stepper
        try:
            self.gradlens_micro_batch_started(stepper)
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            stepper.abort()
            raise
        finally:
            self._gradlens_stepper = None
        # Trainer sets sync_gradients on the step's last micro-batch (and on an epoch's short tail).
        stepper.end_micro_batch(loss, last=bool(self.accelerator.sync_gradients))
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training log lines (they carry ``loss``) gain the last recorded step's split; eval lines do not."""
        callback = self.gradlens_callback
        if callback is not None and "loss" in logs:
            for name, value in callback.pop_trainer_logs().items():
                logs.setdefault(name, value)  # the Trainer's own loss, grad_norm, learning_rate win
        return super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if ROW_GROUPS_KEY in inputs:
            inputs.pop(ROW_GROUPS_KEY)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``torch.compile(model)`` (``model`` itself when it is not compiled).

    With ``torch_compile=True`` the Trainer trains a compiled wrapper of the same module; its
    parameters are the module's, so running the module eagerly updates the same weights.
    """
    return model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model


def _batch_rows(inputs: Mapping[str, Any]) -> Optional[int]:
    """Rows of the batch: dim 0 of its first tensor with a batch dimension."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


__all__ = ["GradlensCallback", "GradlensTrainerMixin", "ROW_GROUPS_KEY", "pair_row_groups"]
