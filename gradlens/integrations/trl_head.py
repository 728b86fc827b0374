"""TRL's fused LM head, unfused on recorded steps so the recorder can split its weight exactly.

TRL 1.16 gets log-probs from ``model(..., labels=..., fused_lm_head=True)``: the
backbone runs, then ``ChunkedLogProbFunction`` multiplies the hidden states by
``lm_head.weight`` in tiles inside one autograd Function. ``lm_head.forward``
never runs, so no module hook sees that use of the weight, and with tied
embeddings the input embedding shares it: the recorder could only report the
weight as *unattributed*.

``RecordingHead`` wraps the policy's (already TRL-patched) ``forward``. On a
recorded step, a ``fused_lm_head=True`` call with gradients enabled is answered
here instead: the same backbone call, then ``lm_head(hidden)`` as a real module
call, then the same per-token fields as TRL's kernel (log-prob, entropy, mean
logit, top-1 flag, log Σp²) with the same logit transform and masking. The head
runs over slices of positions with *all* rows in each call (dim 0 stays the
batch, so the recorder's Linear rule applies) and each slice runs under
activation checkpointing, so only hidden states are kept between forward and
backward, as in the fused kernel. Every other call (unrecorded steps, the
reference forward, evaluation) goes to TRL's fused head unchanged.

The first unfused call is checked against TRL's fused head on the same batch
(one extra no-grad forward, once per trainer); a mismatch stops training with an
error instead of recording a different model.

Memory while recording: one slice's float32 logits and softmax temporaries,
about 5 × ``chunk_elements`` floats at the peak (default 2^24: ~320 MiB); TRL's
fused head holds one 4096-token × 32768-vocab tile (512 MiB in float32, 256 MiB
in bf16), plus its temporaries on CPU. Lower ``head_chunk_elements`` to trade speed for memory. Time: the fused kernel also recomputes its tiles in backward, so the
unfused head does the same matrix products; the recorder's own work is extra.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Optional

import torch
import transformers
from packaging.version import Version
from torch.utils.checkpoint import checkpoint
from trl.trainer.utils import FusedCausalLMOutput

DEFAULT_CHUNK_ELEMENTS = 2**24
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _logit_transform(model: torch.nn.Module) -> tuple[float, Optional[float]]:
    """(logit scale, final softcap) exactly as ``trl.trainer.utils.add_fused_lm_head`` reads them."""
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), softcap


def _backbone_attr(model: torch.nn.Module) -> str:
    text_config = model.config.get_text_config()
    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        return "model"
    return "base_model"


def head_slice(lm_head, hidden, labels, mask, scale: float, softcap: Optional[float], inv_t: float):
    """TRL's per-token fields for one slice of positions, from materialised logits (hooks fire on lm_head)."""
    z = lm_head(hidden).float()
    if scale != 1.0:  # skipped when 1: each step is another slice-sized temporary
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if inv_t != 1.0:
        z = z * inv_t
    target = labels.clamp(min=0)
    log_z = torch.logsumexp(z, dim=-1)
    log_probs = z.gather(-1, target.unsqueeze(-1)).squeeze(-1) - log_z
    entropy = log_z - (torch.softmax(z, dim=-1) * z).sum(-1)
    with torch.no_grad():  # TRL marks these non-differentiable
        log_sum_sq = torch.logsumexp(2 * z, dim=-1) - 2 * log_z
        mean_logits = z.mean(-1)
        is_top1 = z.argmax(-1) == target  # argmax returns the first maximum, as TRL's tie rule
    off = ~mask
    return (
        log_probs.masked_fill(off, 0),
        entropy.masked_fill(off, 0),
        log_sum_sq.masked_fill(off, 0),
        mean_logits.masked_fill(off, 0),
        is_top1 & mask,
    )


class ForwardLog:
    """Fused-head calls seen while ``active``, as ``(grad_enabled, output)``: how the trainer
    reads the log-probs TRL computed for the policy and the reference, without recomputing them."""

    def __init__(self):
        self.active = False
        self.calls: list = []

    def add(self, out) -> None:
        if self.active:
            self.calls.append((torch.is_grad_enabled(), out))


class RecordingHead:
    """Installs itself as ``model.forward``; ``active()`` says when to unfuse the head.

    Fused-head calls are reported to ``log`` (a ``ForwardLog``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        active: Callable[[], bool],
        *,
        outputs: tuple[str, ...],
        temperature: float = 1.0,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        log: Optional[ForwardLog] = None,
    ):
        fused = model.__dict__.get("forward")
        if fused is None or not hasattr(fused, "__func__"):
            raise ValueError(
                f"{type(model).__name__} has no fused LM head: RecordingHead wraps the forward that "
                "trl.trainer.utils.add_fused_lm_head installs (DPOTrainer does this in __init__)"
            )
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        self.fused_fn = fused.__func__  # TRL's _fused_forward, re-bound to whichever module calls it
        self.active = active
        self.outputs = tuple(outputs)
        self.inv_t = 1.0 / temperature
        self.chunk_elements = chunk_elements
        self.scale, self.softcap = _logit_transform(model)
        self.backbone = _backbone_attr(model)
        self.log = log if log is not None else ForwardLog()
        self.verified = False
        head = self

        @functools.wraps(type(model).forward)
        def forward(module, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
            if fused_lm_head and torch.is_grad_enabled() and head.active():
                out = head.unfused(module, args, kwargs, labels, shift_labels, num_items_in_batch)
            else:
                out = head.fused_fn(module, *args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                                    num_items_in_batch=num_items_in_batch, **kwargs)  # fmt: skip
            if fused_lm_head:
                head.log.add(out)
            return out

        model.forward = types.MethodType(forward, model)

    # ---- the unfused path --------------------------------------------------------------------

    def unfused(self, module, args, kwargs, labels, shift_labels, num_items_in_batch) -> FusedCausalLMOutput:
        if kwargs.get("output_router_logits") or getattr(module.config.get_text_config(), "output_router_logits", False):
            raise ValueError(
                "gradlens cannot record mixture-of-experts models: their routers flatten the batch, so rows are no "
                "longer dim 0 of every activation (set output_router_logits=False or record without MoE)"
            )
        reference = self._fused_reference(module, args, kwargs, labels, shift_labels, num_items_in_batch)
        kwargs = {**kwargs, "use_cache": False}
        hidden = getattr(module, self.backbone)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = module.get_output_embeddings()
        hidden, labels = hidden.to(lm_head.weight.device), labels.to(lm_head.weight.device)
        mask = labels != -100
        fields = dict(zip(FIELDS, self._slices(lm_head, hidden, labels, mask)))
        fields = {n: (f if n == "log_probs" or n in self.outputs else None) for n, f in fields.items()}
        loss = -fields["log_probs"].sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        out = FusedCausalLMOutput(loss=loss, label_mask=mask, **fields)
        if reference is not None:
            self._check_against(reference, out, hidden.dtype)
        return out

    def _slices(self, lm_head, hidden, labels, mask):
        rows, positions = hidden.shape[0], hidden.shape[1]
        step = max(1, self.chunk_elements // max(1, rows * lm_head.weight.shape[0]))
        parts = []
        for start in range(0, positions, step):
            sl = slice(start, min(start + step, positions))
            args = (lm_head, hidden[:, sl], labels[:, sl], mask[:, sl], self.scale, self.softcap, self.inv_t)
            # Non-reentrant checkpointing keeps only the slice's hidden states; the logits are
            # recomputed in backward, when lm_head's hooks see their gradient (all rows at once).
            parts.append(checkpoint(head_slice, *args, use_reentrant=False))
        return [torch.cat([p[i] for p in parts], dim=1) for i in range(len(FIELDS))]

    # ---- one-time check against TRL's own fused head ---------------------------------------

    def _fused_reference(self, module, args, kwargs, labels, shift_labels, num_items_in_batch):
        if self.verified:
            return None
        devices = [p.device for p in module.parameters() if p.is_cuda][:1]
        # fork_rng restores the RNG afterwards, so the real forward draws the same dropout masks.
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            return self.fused_fn(module, *args, fused_lm_head=True, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **dict(kwargs))  # fmt: skip

    def _check_against(self, reference: FusedCausalLMOutput, out: FusedCausalLMOutput, dtype: torch.dtype) -> None:
        low = dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(reference.log_probs.device.type)
        atol, rtol = (0.1, 1e-2) if low else (1e-3, 1e-4)
        ref, mine = reference.log_probs.float(), out.log_probs.detach().float()
        if ref.shape != mine.shape:
            raise RuntimeError(f"gradlens's unfused LM head returned log-probs of shape {tuple(mine.shape)}, TRL's fused head {tuple(ref.shape)}")
        diff = (ref - mine).abs().max().item() if ref.numel() else 0.0
        bound = atol + rtol * (ref.abs().max().item() if ref.numel() else 0.0)
        if not diff <= bound:
            raise RuntimeError(
                f"gradlens's unfused LM head disagrees with TRL's fused head on this model: max |Δ log p| = {diff:.3g} "
                f"> {bound:.3g}. The model transforms its logits in a way gradlens does not reproduce; record with "
                "unfused_head=False (the LM head weight is then reported as unattributed) and please report the model type"
            )
        self.verified = True


def tap_forward(model: torch.nn.Module, log: ForwardLog) -> None:
    """Report every fused-head call of ``model`` (the reference) to ``log``."""
    fused = model.__dict__.get("forward")
    if fused is None or not hasattr(fused, "__func__"):
        raise ValueError(f"{type(model).__name__} has no fused LM head to tap (expected DPOTrainer's add_fused_lm_head)")
    fn = fused.__func__

    @functools.wraps(type(model).forward)
    def forward(module, *args, fused_lm_head=False, **kwargs):
        out = fn(module, *args, fused_lm_head=fused_lm_head, **kwargs)
        if fused_lm_head:
            log.add(out)
        return out

    model.forward = types.MethodType(forward, model)
