"""gradlens inside TRL's ``GRPOTrainer`` and ``RLOOTrainer``: every optimizer step's gradient
split into the completions with positive advantage, those with negative advantage and those
with advantage 0.

    from gradlens.integrations.trl import GradlensGRPOTrainer
    trainer = GradlensGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                                  gradlens_dir="runs/grpo-gradlens")
    trainer.train()

Logged per step (steps.csv, TensorBoard, and the Trainer's ``log_history`` / ``report_to``):
``grad_norm/positive``, ``grad_norm/negative``, ``grad/dot``, ``grad/cosine``,
``grad/ratio`` = rho = ||g_negative|| / ||g_positive||, ``grad_norm/zero`` (0 unless a KL
penalty or an entropy bonus reaches zero-advantage rows), the counts of each sign, the
prompt groups with both signs or none, and the mean advantage of each sign
(``gradlens.advantages``). layers.csv holds the same split per layer.

What it relies on in TRL 1.16 (the version ``gradlens.integrations.trl`` checks):
- ``compute_loss(model, inputs)`` gets one micro-batch whose ``inputs["advantages"]`` has
  one advantage per completion (row); the loss is a sum of per-row terms, so rows are
  independent and the split by sign is exact;
- generation happens inside ``_prepare_inputs`` (under no_grad), before ``compute_loss``:
  so the micro-batch's row groups are known only there, and the capture opens there;
- ``_generate_and_score_completions`` returns rows ordered by prompt group (the
  ``num_generations`` completions of a prompt are consecutive before the shuffle), which
  is how the prompt group of each row is recovered after TRL shuffles the rows;
- the policy's log-probs come from the fused LM head (``fused_lm_head=True``), unfused on
  recorded steps as in ``GradlensDPOTrainer`` (``trl_head.py``) so the head weight, tied or
  not, is split exactly.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .trl import check_trl_version  # noqa: F401  (importing it checks the installed TRL version first)

import torch  # noqa: E402
import trl  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from trl import GRPOTrainer, RLOOTrainer  # noqa: E402

from ..advantages import ZERO, advantage_groups  # noqa: E402
from ..runs import schema  # noqa: E402
from .stepper import StepCapture  # noqa: E402
from .transformers import GradlensCallback, GradlensTrainerMixin, _batch_rows  # noqa: E402
from .trl_head import DEFAULT_CHUNK_ELEMENTS, RecordingHead  # noqa: E402

PROMPT_GROUP_KEY = "gradlens_prompt_group"  # a column gradlens adds to TRL's generation batch


class GradlensAdvantageMixin(GradlensTrainerMixin):
    """Mix into a ``GRPOTrainer`` or ``RLOOTrainer`` (subclass). Keyword arguments (the rest go to TRL):
    ``gradlens_dir``: record into this run directory (or pass a ``GradlensCallback`` in ``callbacks``);
    ``unfused_head``: unfuse TRL's LM head on recorded steps (exact head split; default True);
    ``head_chunk_elements``: logits elements per unfused slice (memory bound).
    """

    gradlens_method = "grpo"  # the run's config.json "loss"

    def __init__(
        self,
        *args,
        gradlens_dir: str | os.PathLike | None = None,
        unfused_head: bool = True,
        head_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        **kwargs,
    ):
        super().__init__(*args, gradlens_dir=gradlens_dir, **kwargs)
        self.gradlens_unfused_head = unfused_head
        self._gradlens_stepper: Optional[StepCapture] = None
        self._gradlens_opened = False
        self._gradlens_generations = 0
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._gradlens_head = RecordingHead(
            policy, self._gradlens_unfuse_now, outputs=("log_probs", "entropy"), temperature=self.temperature,
            chunk_elements=head_chunk_elements,
        )  # fmt: skip

    def _gradlens_unfuse_now(self) -> bool:
        stepper = self._gradlens_stepper
        return self.gradlens_unfused_head and stepper is not None and stepper.recording

    def train(self, *args, **kwargs):
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GradlensCallback):
                # TRL logs its own `reward` (per reward function too); the step table leaves that column out.
                callback.columns = tuple(c for c in schema.ADVANTAGE_STEP_COLUMNS if c != schema.REWARD_MEAN)
                callback.pair, callback.extra_groups = schema.ADVANTAGE_GROUPS, (ZERO,)
                callback.config.update(self._gradlens_config())
        return super().train(*args, **kwargs)

    def _gradlens_config(self) -> dict[str, Any]:
        return {
            "env": "trl",
            "loss": self.gradlens_method,
            schema.CONFIG_GROUPS: list(schema.ADVANTAGE_GROUPS),
            "trl_loss_type": getattr(self, "loss_type", "rloo"),
            "beta": self.beta,
            "num_generations": self.num_generations,
            "num_iterations": self.num_iterations,
            "steps_per_generation": self.args.steps_per_generation,
            "trl_version": trl.__version__,
            "lm_head": "unfused on recorded steps" if self.gradlens_unfused_head else "fused (head weight unattributed)",
            "model": getattr(getattr(self.model, "config", None), "_name_or_path", ""),
        }

    # ---- which prompt each completion answers ----------------------------------------------

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training:
            rows = output["completion_ids"].shape[0]
            # Global row index // num_generations is the prompt group (rows are in prompt order here;
            # each process holds a contiguous slice). The generation counter keeps ids unique over the run.
            first = self.accelerator.process_index * rows
            group = (torch.arange(first, first + rows) // self.num_generations).to(output["completion_ids"].device)
            output[PROMPT_GROUP_KEY] = group + self._gradlens_generations * (1 << 32)
            self._gradlens_generations += 1
        return output

    # ---- one micro-batch ---------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        callback = self.gradlens_callback
        stepper = callback.stepper if callback is not None else None
        # Not GradlensTrainerMixin.training_step: the row groups are known only after generation.
        step = super(GradlensTrainerMixin, self).training_step
        if stepper is None:
            return step(model, inputs, num_items_in_batch)
        self._gradlens_stepper, self._gradlens_opened = stepper, False
        try:
            loss = step(model, inputs, num_items_in_batch)
            if not self._gradlens_opened:
                raise RuntimeError(f"{type(self).__name__}.training_step ran no training compute_loss: nothing to record")
        except BaseException:
            stepper.abort()
            raise
        finally:
            self._gradlens_stepper = None
        stepper.end_micro_batch(loss, last=bool(self.accelerator.sync_gradients))
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stepper = self._gradlens_stepper
        if stepper is not None and self.model.training and torch.is_grad_enabled():
            advantages = inputs["advantages"]
            stepper.begin_micro_batch(self.state.global_step, advantage_groups(advantages), num_rows=_batch_rows(inputs))
            self._gradlens_opened = True
            notes = {"advantages": self.accelerator.gather(advantages.detach().float().contiguous())}
            if PROMPT_GROUP_KEY in inputs:
                notes["prompt_ids"] = self.accelerator.gather(inputs[PROMPT_GROUP_KEY].contiguous())
            stepper.note(**notes)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class GradlensGRPOTrainer(GradlensAdvantageMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` with the positive/negative-advantage split recorded (``gradlens_dir=``)."""


class GradlensRLOOTrainer(GradlensAdvantageMixin, RLOOTrainer):
    """``trl.RLOOTrainer`` with the positive/negative-advantage split recorded (``gradlens_dir=``)."""

    gradlens_method = "rloo"


__all__ = ["GradlensAdvantageMixin", "GradlensGRPOTrainer", "GradlensRLOOTrainer"]
