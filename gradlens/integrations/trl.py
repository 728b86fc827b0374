"""gradlens inside TRL's ``DPOTrainer``: the chosen/rejected split of every optimizer
step, and Balanced-DPO / AdaDPO as DPOTrainer losses.

Install with ``pip install 'gradlens[trl]'``. Supported: TRL 1.16.x (tested with
1.16.0, transformers 5.25); other versions fail at import with a clear message
(set ``GRADLENS_ALLOW_UNSUPPORTED_TRL=1`` to try anyway, with a warning).

    from gradlens.integrations.trl import GradlensDPOTrainer
    trainer = GradlensDPOTrainer(model=..., args=DPOConfig(...), train_dataset=..., processing_class=tok,
                                 gradlens_dir="runs/dpo-gradlens", loss="balanced")
    trainer.train()

What it relies on in TRL 1.16 (why the version is pinned):
- every batch is ``[chosen; rejected]`` along dim 0 (``DataCollatorForPreference``),
  in every micro-batch; the last micro-batch may be smaller;
- ``_compute_loss`` gets per-token log-probs from
  ``model(..., labels=..., fused_lm_head=True).log_probs`` and sums
  ``log_probs[:, -seq_len:]`` over positions (``ld_alpha`` reweights the tail);
- ``DPOConfig`` turns activation (gradient) checkpointing on by default; the
  recorder pairs every forward call with its own gradient, so recomputation is
  exact (tested with it on);
- ``torch_compile=True``: the Trainer trains a compiled wrapper; recorded steps
  run the module inside it (``GradlensTrainerMixin.training_step``) and the hooks
  are on only during recorded steps, so the others keep the compiled graph;
- ``padding_free=True`` packs all rows into one sequence: refused, the split
  needs the chosen and rejected rows along dim 0.

The fused LM head is unfused on recorded steps (``trl_head.py``): exact split of
``lm_head.weight`` and of a tied embedding, for about 5 × ``head_chunk_elements``
floats of logits temporaries at the peak (~320 MiB at the default 2^24). ``unfused_head=False`` keeps TRL's fused kernel; the head
weight (and a tied embedding) is then reported as unattributed and left out of
the split totals.

Losses: ``loss="dpo"`` trains TRL's own loss (any ``loss_type``); ``"balanced"``
and ``"adadpo"`` replace TRL's loss by ``gradlens.preference_loss`` computed from
TRL's own policy and reference log-probs. The returned loss has DPO's value (so
TRL's ``loss`` log stays comparable) and exactly the method's gradient. TRL's
metrics are logged as usual, plus ``weights/chosen`` and ``weights/rejected``.
"""

from __future__ import annotations

import os
import warnings

from packaging.version import Version

SUPPORTED_TRL = ">=1.16.0,<1.17.0"
_MIN, _MAX = Version("1.16.0"), Version("1.17.0")
ALLOW_ENV = "GRADLENS_ALLOW_UNSUPPORTED_TRL"

try:
    import trl
    from trl import DPOTrainer
except ImportError as exc:  # the optional extra is missing
    raise ImportError(
        "gradlens.integrations.trl needs TRL, which is not installed: pip install 'gradlens[trl]' "
        f"(gradlens supports trl{SUPPORTED_TRL})"
    ) from exc


def check_trl_version(version: str) -> None:
    """Raise (or warn, with GRADLENS_ALLOW_UNSUPPORTED_TRL=1) when ``version`` is not supported."""
    if _MIN <= Version(version) < _MAX:
        return
    message = (
        f"gradlens.integrations.trl supports trl{SUPPORTED_TRL}, but trl {version} is installed. It patches "
        "DPOTrainer internals (the fused LM head and _compute_loss) that change between TRL releases, so it could "
        f"record wrong numbers. Install a supported TRL (pip install 'gradlens[trl]') or set {ALLOW_ENV}=1 to try anyway."
    )
    if os.environ.get(ALLOW_ENV) == "1":
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return
    raise ImportError(message)


check_trl_version(trl.__version__)

from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402
from accelerate.utils import is_peft_model  # noqa: E402

from ..losses import REWEIGHTINGS, preference_loss  # noqa: E402
from .run_log import PREFERENCE_COLUMNS  # noqa: E402
from .stepper import StepCapture  # noqa: E402
from ..pairs import pair_groups, split_pairs  # noqa: E402
from .transformers import GradlensCallback, GradlensTrainerMixin  # noqa: E402
from .trl_head import DEFAULT_CHUNK_ELEMENTS, ForwardLog, RecordingHead, tap_forward  # noqa: E402

# DPOTrainer's fused-head outputs (see DPOTrainer.__init__).
_HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


class GradlensDPOMixin(GradlensTrainerMixin):
    """Mix into a ``DPOTrainer`` (subclass): ``class MyTrainer(GradlensDPOMixin, MyDPOTrainer)``.

    Keyword arguments (the rest go to ``DPOTrainer``):
    ``loss``: "dpo" (TRL's own ``loss_type``), "balanced" or "adadpo" (gradlens.losses);
    ``balance_space``, ``adadpo_cap``: passed to ``gradlens.preference_loss``;
    ``gradlens_dir``: record into this run directory (or pass a ``GradlensCallback`` in ``callbacks``);
    ``unfused_head``: unfuse TRL's LM head on recorded steps (exact head split; default True);
    ``head_chunk_elements``: logits elements per unfused slice (memory bound).
    """

    def __init__(
        self,
        *args,
        loss: str = "dpo",
        balance_space: str = "sequence",
        adadpo_cap: float = 2.0,
        gradlens_dir: str | os.PathLike | None = None,
        unfused_head: bool = True,
        head_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        **kwargs,
    ):
        if loss not in REWEIGHTINGS:
            raise ValueError(f"loss={loss!r}: choose one of {sorted(REWEIGHTINGS)}")
        if REWEIGHTINGS[loss].rebalance is not None:  # would silently train DPO under its name
            raise ValueError(f"loss={loss!r} rewrites the gradient from the recorder's pieces; it runs in `gradlens record` only")
        if balance_space not in ("sequence", "token_mean"):
            raise ValueError(f"balance_space must be 'sequence' or 'token_mean', got {balance_space!r}")
        config = kwargs.get("args")
        if getattr(config, "padding_free", False):
            raise ValueError("padding_free=True packs every row into one sequence; gradlens needs the chosen and rejected rows along dim 0")
        super().__init__(*args, gradlens_dir=gradlens_dir, **kwargs)
        self.gradlens_loss, self.balance_space, self.adadpo_cap = loss, balance_space, float(adadpo_cap)
        self.gradlens_unfused_head = unfused_head
        self._gradlens_stepper: Optional[StepCapture] = None
        if loss != "dpo":
            self._check_loss_replaceable()
        self._gradlens_forwards = ForwardLog()
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        outputs = _HEAD_OUTPUTS + (("log_sum_sq_probs",) if self.use_weighting else ())
        self._gradlens_head = RecordingHead(
            policy, self._gradlens_unfuse_now, outputs=outputs, chunk_elements=head_chunk_elements, log=self._gradlens_forwards
        )
        if self.ref_model is not None:  # with torch_compile, the ref model is compiled here: tap the module inside
            tap_forward(self.accelerator.unwrap_model(self.ref_model, keep_torch_compile=False), self._gradlens_forwards)

    def _check_loss_replaceable(self) -> None:
        problems = []
        if list(self.loss_types) != ["sigmoid"] or list(self.loss_weights) != [1.0]:
            problems.append(f"loss_type={self.loss_types} with loss_weights={self.loss_weights} (needs ['sigmoid'], [1.0])")
        if self.f_divergence_type != "reverse_kl":
            problems.append(f"f_divergence_type={self.f_divergence_type!r} (needs 'reverse_kl')")
        if self.use_weighting:
            problems.append("use_weighting=True")
        if self.aux_loss_enabled:
            problems.append("a mixture-of-experts auxiliary loss")
        if problems:
            raise ValueError(
                f"loss={self.gradlens_loss!r} replaces DPO's sigmoid loss, so it cannot be combined with " + "; ".join(problems)
            )

    def _gradlens_unfuse_now(self) -> bool:
        stepper = self._gradlens_stepper
        return self.gradlens_unfused_head and stepper is not None and stepper.recording

    # ---- gradlens hooks ----------------------------------------------------------------------

    def gradlens_row_groups(self, inputs: dict) -> dict[str, slice]:
        chosen, _ = split_pairs(inputs["input_ids"])  # raises on an odd number of rows
        return pair_groups(int(chosen.shape[0]))

    def train(self, *args, **kwargs):
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GradlensCallback):
                callback.columns = PREFERENCE_COLUMNS
                callback.config.update(self._gradlens_config())
        return super().train(*args, **kwargs)

    def _gradlens_config(self) -> dict[str, Any]:
        return {
            "env": "trl",
            "loss": self.gradlens_loss,
            "beta": self.beta,
            "balance_space": self.balance_space,
            "adadpo_cap": self.adadpo_cap,
            "trl_loss_type": list(self.loss_types),
            "trl_version": trl.__version__,
            "max_length": self.args.max_length,
            "precompute_ref_log_probs": bool(self.precompute_ref_logps),
            "lm_head": "unfused on recorded steps" if self.gradlens_unfused_head else "fused (head weight unattributed)",
            "model": getattr(getattr(self.model, "config", None), "_name_or_path", ""),
        }

    # ---- the loss ----------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = self.model.training and torch.is_grad_enabled()
        completion_mask = inputs["completion_mask"]
        precomputed = (inputs.get("ref_chosen_logps"), inputs.get("ref_rejected_logps"))
        forwards = self._gradlens_forwards
        forwards.calls.clear()
        forwards.active = training
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if not training:
                return result
            loss, rest = result if return_outputs else (result, None)
            out, logps = self._pair_loss(forwards.calls, completion_mask, precomputed)
        finally:
            forwards.active = False
            forwards.calls.clear()
        if self.gradlens_loss != "dpo":
            # DPO's value, the method's gradient: the detached difference carries no gradient.
            loss = out.loss + (out.dpo_loss - out.loss.detach())
        self._note_pairs(logps)
        return (loss, rest) if return_outputs else loss

    def _sequence_logps(self, per_token: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """TRL's sequence log-prob from per-token log-probs (DPOTrainer._compute_loss, incl. ld_alpha)."""
        shift_mask = completion_mask[..., 1:]
        per_token = per_token[:, -shift_mask.size(1) :]
        if self.ld_alpha is None:
            return per_token.sum(dim=1)
        position = shift_mask.cumsum(dim=1)
        lengths = shift_mask.sum(dim=1).long()
        shared = torch.minimum(*split_pairs(lengths))
        shared = torch.cat([shared, shared], dim=0).to(per_token.device).unsqueeze(1)
        shared_mask = (position > 0) & (position <= shared)
        return (per_token * shared_mask).sum(dim=1) + self.ld_alpha * (per_token * (position > shared)).sum(dim=1)

    def _pair_loss(self, calls, completion_mask, precomputed):
        policy = [out for grad, out in calls if grad]
        if len(policy) != 1:
            raise RuntimeError(f"expected one policy forward with gradients in DPOTrainer.compute_loss, saw {len(policy)}")
        logps = self._sequence_logps(policy[0].log_probs, completion_mask)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = (t.to(logps.device) for t in precomputed)
        else:
            ref = [out for grad, out in calls if not grad]
            if len(ref) != 1:
                raise RuntimeError(f"expected one reference forward in DPOTrainer.compute_loss, saw {len(ref)}")
            ref_chosen, ref_rejected = split_pairs(self._sequence_logps(ref[0].log_probs, completion_mask))
        chosen, rejected = split_pairs(logps)
        lengths_c, lengths_r = split_pairs(completion_mask.sum(dim=1))
        values = (chosen, rejected, ref_chosen, ref_rejected, lengths_c, lengths_r)
        return self._preference(*values), tuple(v.detach() for v in values)

    def _preference(self, chosen, rejected, ref_chosen, ref_rejected, lengths_c, lengths_r):
        return preference_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, method=self.gradlens_loss,
            balance_space=self.balance_space, chosen_lengths=lengths_c, rejected_lengths=lengths_r, adadpo_cap=self.adadpo_cap,
        )  # fmt: skip

    def _note_pairs(self, logps: tuple) -> None:
        """Per-pair diagnostics over all processes: for TRL's logs and the gradlens step row."""
        gathered = [self.accelerator.gather(v.float().contiguous()) for v in logps]
        with torch.no_grad():
            out = self._preference(*gathered)
        if self.gradlens_loss != "dpo":
            self._metrics["train"]["weights/chosen"].append(out.weight_chosen.mean().item())
            self._metrics["train"]["weights/rejected"].append(out.weight_rejected.mean().item())
        if self._gradlens_stepper is not None:
            self._gradlens_stepper.note(pairs=out, chosen_logps=gathered[0], rejected_logps=gathered[1])


class GradlensDPOTrainer(GradlensDPOMixin, DPOTrainer):
    """``trl.DPOTrainer`` with gradlens recording (``gradlens_dir=``) and ``loss="dpo" | "balanced" | "adadpo"``."""


# The other TRL trainers live in their own modules; imported when first named, so that each of
# those modules can import this one (the TRL version check) first.
_ELSEWHERE = {
    "GradlensAdvantageMixin": "trl_grpo",
    "GradlensGRPOTrainer": "trl_grpo",
    "GradlensRLOOTrainer": "trl_grpo",
    "GradlensKTOMixin": "trl_kto",
    "GradlensKTOTrainer": "trl_kto",
    "GradlensRewardMixin": "trl_reward",
    "GradlensRewardTrainer": "trl_reward",
}


def __getattr__(name: str):
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_ELSEWHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GradlensDPOMixin", "GradlensDPOTrainer", "GradlensCallback", "SUPPORTED_TRL", "check_trl_version", *_ELSEWHERE]
