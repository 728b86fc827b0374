r"""DPO-family preference losses and the registry of reweighting strategies.

All methods share DPO's per-pair coefficient. With
u_i = β[(ℓ_w − ℓ_w,ref) − (ℓ_l − ℓ_l,ref)], DPO's gradient is

    ∇L = (1/B) Σ_i βσ(−u_i) [ −∇ℓ_w^i + ∇ℓ_l^i ].

A *reweighting* multiplies the chosen and rejected terms by detached weights
(a_w, a_l) and, for AdaDPO, uses a per-pair β_w for the chosen term:

    ∇L_method = (1/B) Σ_i σ(−u_i) [ −β_w a_w ∇ℓ_w^i + β_l a_l ∇ℓ_l^i ].

It is implemented as the surrogate

    L_method = (1/B) Σ_i sg(σ(−u_i)) [ −β_w a_w ℓ_w^i + β_l a_l ℓ_l^i ],

whose gradient is exactly the line above (``sg`` = stop-gradient). For DPO the
surrogate is not needed: ``.loss`` is the DPO loss itself.

**Why Balanced-DPO weights.** With respect to sequence probabilities p = e^ℓ,
∂L/∂p_w = −βσ(−u)/p_w and ∂L/∂p_l = βσ(−u)/p_l: the rejected sensitivity is
p_w/p_l times the chosen one. Weights with a_w/p_w = a_l/p_l equalise them;
a_w = 2σ(ℓ_w − ℓ_l), a_l = 2σ(ℓ_l − ℓ_w) do so while keeping a_w + a_l = 2
(so the update's scale stays DPO's). This is gradlens's precise version of the
"computationally efficient gradient reweighting" that Ma et al. (2025) describe;
the paper's own formula is not given there and is *not* reproduced here.

``balance_space="token_mean"`` computes the weights from per-token mean
log-probabilities (ℓ / number of completion tokens) so long sequences do not
saturate the sigmoid.

**AdaDPO-style comparator.** β_w = β·min(sg(p_w/p_l), C), C = 2; β_l = β.

To add a method, write one function ``(ctx: PairContext) -> (beta_w, beta_l, a_w, a_l)``
and decorate it with ``@register_reweighting("name")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PairContext:
    """Detached per-pair quantities a reweighting strategy may use."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    u: torch.Tensor
    beta: float
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    options: dict


REWEIGHTINGS: dict[str, Callable[[PairContext], Weights]] = {}


def register_reweighting(name: str):
    """Register ``fn(ctx) -> (beta_w, beta_l, a_w, a_l)`` under ``name``."""

    def decorate(fn: Callable[[PairContext], Weights]):
        if name in REWEIGHTINGS:
            raise ValueError(f"reweighting {name!r} is already registered")
        REWEIGHTINGS[name] = fn
        return fn

    return decorate


@register_reweighting("dpo")
def _dpo(ctx: PairContext) -> Weights:
    ones = torch.ones_like(ctx.u)
    return ctx.beta * ones, ctx.beta * ones, ones, ones


@register_reweighting("balanced")
def _balanced(ctx: PairContext) -> Weights:
    space = ctx.options.get("balance_space", "sequence")
    if space == "sequence":
        diff = ctx.chosen_logps - ctx.rejected_logps
    elif space == "token_mean":
        if ctx.chosen_lengths is None or ctx.rejected_lengths is None:
            raise ValueError("balance_space='token_mean' needs chosen_lengths and rejected_lengths (completion token counts)")
        diff = ctx.chosen_logps / ctx.chosen_lengths - ctx.rejected_logps / ctx.rejected_lengths
    else:
        raise ValueError(f"balance_space must be 'sequence' or 'token_mean', got {space!r}")
    ones = torch.ones_like(ctx.u)
    return ctx.beta * ones, ctx.beta * ones, 2 * torch.sigmoid(diff), 2 * torch.sigmoid(-diff)


@register_reweighting("adadpo")
def _adadpo(ctx: PairContext) -> Weights:
    cap = float(ctx.options.get("adadpo_cap", 2.0))
    ratio = torch.exp(ctx.chosen_logps - ctx.rejected_logps)  # p_w / p_l
    ones = torch.ones_like(ctx.u)
    return ctx.beta * torch.clamp(ratio, max=cap), ctx.beta * ones, ones, ones


@dataclass
class PreferenceLossOutput:
    """``.loss`` to backpropagate; DPO's value and per-pair diagnostics beside it.

    Per-pair tensors are detached and have shape (B,).
    """

    loss: torch.Tensor
    dpo_loss: torch.Tensor
    u: torch.Tensor
    sigmoid_neg_u: torch.Tensor
    weight_chosen: torch.Tensor
    weight_rejected: torch.Tensor
    beta_chosen: torch.Tensor
    beta_rejected: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    log_pw_over_pl: torch.Tensor
    nonfinite: bool

    def _accuracy(self) -> float:
        """Share of pairs with r_chosen > r_rejected; NaN when a reward is NaN (a comparison with NaN is no answer)."""
        if bool(torch.isnan(self.chosen_rewards).any() or torch.isnan(self.rejected_rewards).any()):
            return float("nan")
        return (self.chosen_rewards > self.rejected_rewards).float().mean().item()

    def metrics(self) -> dict[str, float]:
        """Batch means under TRL's names (plus gradlens's own)."""
        from .runs import schema

        return {
            schema.LOSS: self.dpo_loss.item(),
            schema.REWARDS_CHOSEN: self.chosen_rewards.mean().item(),
            schema.REWARDS_REJECTED: self.rejected_rewards.mean().item(),
            schema.REWARDS_MARGINS: self.margins.mean().item(),
            schema.REWARDS_ACCURACIES: self._accuracy(),
            schema.LOG_PW_OVER_PL: self.log_pw_over_pl.mean().item(),
            schema.SIGMOID_NEG_U: self.sigmoid_neg_u.mean().item(),
            schema.WEIGHT_CHOSEN: self.weight_chosen.mean().item(),
            schema.WEIGHT_REJECTED: self.weight_rejected.mean().item(),
        }


def _check_shapes(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"log-probabilities must all be 1-D tensors of the same length B; got shapes {shapes}")


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    method: str = "dpo",
    balance_space: str = "sequence",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    adadpo_cap: float = 2.0,
) -> PreferenceLossOutput:
    """DPO, Balanced-DPO or AdaDPO from summed completion log-probs of shape (B,).

    NaN inputs propagate: the loss becomes NaN and ``.nonfinite`` is True; nothing
    is replaced or dropped.
    """
    if method not in REWEIGHTINGS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(REWEIGHTINGS)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    _check_shapes(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    chosen_ratio = chosen_logps - ref_chosen_logps.detach()
    rejected_ratio = rejected_logps - ref_rejected_logps.detach()
    u = beta * (chosen_ratio - rejected_ratio)
    dpo_loss = -F.logsigmoid(u).mean()

    ctx = PairContext(
        chosen_logps=chosen_logps.detach(),
        rejected_logps=rejected_logps.detach(),
        u=u.detach(),
        beta=float(beta),
        chosen_lengths=None if chosen_lengths is None else chosen_lengths.detach().to(chosen_logps.dtype),
        rejected_lengths=None if rejected_lengths is None else rejected_lengths.detach().to(chosen_logps.dtype),
        options={"balance_space": balance_space, "adadpo_cap": adadpo_cap},
    )
    beta_w, beta_l, a_w, a_l = (t.detach() for t in REWEIGHTINGS[method](ctx))
    coeff = torch.sigmoid(-u.detach())
    if method == "dpo":
        loss = dpo_loss
    else:
        loss = (coeff * (-beta_w * a_w * chosen_logps + beta_l * a_l * rejected_logps)).mean()

    with torch.no_grad():
        chosen_rewards = beta * chosen_ratio.detach()
        rejected_rewards = beta * rejected_ratio.detach()
        nonfinite = not bool(torch.isfinite(dpo_loss).item())
    return PreferenceLossOutput(
        loss=loss,
        dpo_loss=dpo_loss.detach(),
        u=u.detach(),
        sigmoid_neg_u=coeff,
        weight_chosen=a_w,
        weight_rejected=a_l,
        beta_chosen=beta_w,
        beta_rejected=beta_l,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=chosen_rewards - rejected_rewards,
        log_pw_over_pl=(chosen_logps - rejected_logps).detach(),
        nonfinite=nonfinite,
    )
