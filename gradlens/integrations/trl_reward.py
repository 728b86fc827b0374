"""gradlens inside TRL's ``RewardTrainer``: every optimizer step's gradient of the reward
model split into the chosen side and the rejected side of its pairs.

    from gradlens.integrations.trl import GradlensRewardTrainer
    trainer = GradlensRewardTrainer(model=..., args=RewardConfig(...), train_dataset=..., processing_class=tok,
                                    gradlens_dir="runs/reward-gradlens")
    trainer.train()

Logged per step: ``grad_norm/chosen``, ``grad_norm/rejected``, ``grad/dot``, ``grad/cosine``,
``grad/ratio`` = ||g_rejected|| / ||g_chosen||, per layer in layers.csv, and the model's
mean score of each side (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``: here the reward model's own scores, not DPO's implicit rewards).

What it relies on in TRL 1.16: every batch is ``[chosen; rejected]`` along dim 0
(``DataCollatorForPreference`` of ``reward_trainer.py``), and ``compute_loss`` scores all
rows in one ``model(**inputs)`` call, one score per row; the Bradley-Terry loss couples the
two rows of a pair only through their scores, so "the gradient through the chosen rows"
is well defined and exact. A sequence classifier has no LM head, so there is nothing to
unfuse.
"""

from __future__ import annotations

from .trl import check_trl_version  # noqa: F401  (importing it checks the installed TRL version first)

from typing import Any, Mapping  # noqa: E402

import torch  # noqa: E402
import trl  # noqa: E402
from trl import RewardTrainer  # noqa: E402

from ..pairs import pair_groups, split_pairs  # noqa: E402
from ..runs import schema  # noqa: E402
from .transformers import GradlensCallback, GradlensTrainerMixin  # noqa: E402


class GradlensRewardMixin(GradlensTrainerMixin):
    """Mix into a ``RewardTrainer`` (subclass); ``gradlens_dir=`` records into that run directory."""

    def gradlens_row_groups(self, inputs: dict) -> Mapping[str, Any]:
        chosen, _ = split_pairs(inputs["input_ids"])  # raises on an odd number of rows
        return pair_groups(int(chosen.shape[0]))

    def train(self, *args, **kwargs):
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GradlensCallback):
                callback.columns = schema.REWARD_MODEL_STEP_COLUMNS
                callback.config.update(self._gradlens_config())
        return super().train(*args, **kwargs)

    def _gradlens_config(self) -> dict[str, Any]:
        return {
            "env": "trl",
            "loss": "reward_model",
            schema.CONFIG_GROUPS: list(schema.DEFAULT_GROUPS),
            "center_rewards_coefficient": self.args.center_rewards_coefficient,
            "trl_version": trl.__version__,
            "model": getattr(getattr(self.model, "config", None), "_name_or_path", ""),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = self.model.training and torch.is_grad_enabled()
        stepper = getattr(self, "_gradlens_stepper", None)
        if not (training and stepper is not None):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        scores = self.accelerator.gather(outputs.logits.detach().float().squeeze(-1).contiguous())
        chosen, rejected = split_pairs(scores) if self.accelerator.num_processes == 1 else _gathered_sides(scores, self.accelerator.num_processes)
        stepper.note(scores_chosen=chosen, scores_rejected=rejected)
        return (loss, outputs) if return_outputs else loss


def _gathered_sides(scores: torch.Tensor, processes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each process's rows are its own [chosen; rejected]: split them per process, then concatenate."""
    sides = [split_pairs(part) for part in scores.chunk(processes)]
    return torch.cat([c for c, _ in sides]), torch.cat([r for _, r in sides])


class GradlensRewardTrainer(GradlensRewardMixin, RewardTrainer):
    """``trl.RewardTrainer`` with the chosen/rejected split of the reward model's gradient (``gradlens_dir=``)."""


__all__ = ["GradlensRewardMixin", "GradlensRewardTrainer"]
