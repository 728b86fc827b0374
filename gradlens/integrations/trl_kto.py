"""gradlens inside TRL's ``KTOTrainer``: every optimizer step's gradient split into the
desirable and the undesirable completions.

    from gradlens.integrations.trl import GradlensKTOTrainer
    trainer = GradlensKTOTrainer(model=..., args=KTOConfig(...), train_dataset=..., processing_class=tok,
                                 gradlens_dir="runs/kto-gradlens")
    trainer.train()

Logged per step: ``grad_norm/desirable``, ``grad_norm/undesirable``, ``grad/dot``,
``grad/cosine``, ``grad/ratio`` = ||g_undesirable|| / ||g_desirable||, the rows of each kind
(``counts/desirable``, ``counts/undesirable``), per layer in layers.csv; the Trainer's own
logs (``log_history``, ``report_to``) gain the same keys.

What it relies on in TRL 1.16:
- a micro-batch's rows are its examples, and ``inputs["label"]`` says which are desirable;
  KTO's loss is a mean of per-row terms, so the split by label is exact;
- the KL-estimate rows (``KL_input_ids``: mismatched prompt/completion pairs) are scored
  under ``torch.no_grad()`` and the KL estimate is detached: they carry no gradient, so they
  are no group of the split (the recorder sees no backward through them);
- the policy's log-probs come from the fused LM head, unfused on recorded steps
  (``trl_head.py``) so the head weight, tied or not, is split exactly.
"""

from __future__ import annotations

from .trl import check_trl_version  # noqa: F401  (importing it checks the installed TRL version first)

import os  # noqa: E402
from typing import Any, Mapping, Optional  # noqa: E402

import torch  # noqa: E402
import trl  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402
from trl import KTOTrainer  # noqa: E402

from ..runs import schema  # noqa: E402
from .stepper import StepCapture  # noqa: E402
from .transformers import GradlensCallback, GradlensTrainerMixin  # noqa: E402
from .trl_head import DEFAULT_CHUNK_ELEMENTS, RecordingHead  # noqa: E402


def label_groups(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row indices of the desirable (label true) and undesirable examples; either may be empty."""
    labels = torch.as_tensor(labels).detach().cpu().bool().reshape(-1)
    return {schema.DESIRABLE: labels.nonzero().flatten(), schema.UNDESIRABLE: (~labels).nonzero().flatten()}


class GradlensKTOMixin(GradlensTrainerMixin):
    """Mix into a ``KTOTrainer`` (subclass). Keyword arguments (the rest go to TRL):
    ``gradlens_dir``, ``unfused_head``, ``head_chunk_elements`` as for ``GradlensDPOTrainer``.
    """

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
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._gradlens_head = RecordingHead(
            policy, self._gradlens_unfuse_now, outputs=("log_probs", "entropy", "mean_logits"), chunk_elements=head_chunk_elements
        )

    def _gradlens_unfuse_now(self) -> bool:
        stepper = self._gradlens_stepper
        return self.gradlens_unfused_head and stepper is not None and stepper.recording

    def gradlens_row_groups(self, inputs: dict) -> Mapping[str, Any]:
        if "label" not in inputs:
            raise ValueError(f"a KTO batch has a 'label' entry (desirable or not); this one has {sorted(inputs)}")
        return label_groups(inputs["label"])

    def train(self, *args, **kwargs):
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GradlensCallback):
                callback.columns, callback.pair = schema.KTO_STEP_COLUMNS, schema.KTO_GROUPS
                callback.config.update(self._gradlens_config())
        return super().train(*args, **kwargs)

    def _gradlens_config(self) -> dict[str, Any]:
        return {
            "env": "trl",
            "loss": "kto",
            schema.CONFIG_GROUPS: list(schema.KTO_GROUPS),
            "trl_loss_type": self.loss_type,
            "beta": self.beta,
            "desirable_weight": self.desirable_weight,
            "undesirable_weight": self.undesirable_weight,
            "kl_estimate": bool(self.calculate_KL),
            "trl_version": trl.__version__,
            "lm_head": "unfused on recorded steps" if self.gradlens_unfused_head else "fused (head weight unattributed)",
            "model": getattr(getattr(self.model, "config", None), "_name_or_path", ""),
        }


class GradlensKTOTrainer(GradlensKTOMixin, KTOTrainer):
    """``trl.KTOTrainer`` with the desirable/undesirable split recorded (``gradlens_dir=``)."""


__all__ = ["GradlensKTOMixin", "GradlensKTOTrainer", "label_groups"]
