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

**The probability-space family ("power").** a_w ∝ p_w^τ, a_l ∝ p_l^τ with
a_w + a_l = 2, i.e. a_w = 2σ(τ(ℓ_w − ℓ_l)). τ = 0 is DPO, τ = 1 is Balanced-DPO;
τ in between balances partly. Once ℓ_w − ℓ_l is a few nats, τ = 1 drives a_l to 0
and the update becomes σ-weighted SFT on the chosen response; a smaller τ
saturates later.

**Parameter-space balancing ("norm_balanced").** Not a per-pair weighting: the
loss is DPO's, and after backward the step's recorded chosen and rejected
gradient pieces g_c, g_r (which the recorder already holds) are rescaled to
equal norms, m = (‖g_c‖ + ‖g_r‖)/2, so the update
m·(g_c/‖g_c‖ + g_r/‖g_r‖) keeps DPO's scale (the sum of the two piece norms).
It needs no extra backward pass. ``balance_scope="per_layer"`` does the same
per parameter tensor. Training loops apply it through
``Reweighting.rebalance`` (``gradlens record`` does); a loop that cannot
(e.g. one without a recorder) must refuse the method rather than run DPO
under its name.

To add a method, write one function ``(ctx: PairContext) -> (beta_w, beta_l, a_w, a_l)``
and decorate it with ``@register_reweighting("name", options=...)``. The
registry is what ``gradlens record --loss`` offers, and the method's
``options`` are what ``--loss-option KEY=VALUE`` accepts.

A method and its options are resolved once, by ``resolve_loss``, into a
``LossSpec`` (defaults filled in, every value checked); that object is what
travels to ``preference_loss`` and to ``Reweighting.rebalance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from . import metric_names as names
from .balance import rebalance_capture

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
    options: Mapping[str, object]  # the method's resolved options (LossSpec.options)


@dataclass(frozen=True)
class Option:
    """One setting a method accepts: ``--loss-option NAME=VALUE`` on the CLI."""

    name: str
    default: object
    help: str
    choices: tuple | None = None
    positive: bool = False  # numbers only: must be > 0 (else >= 0)

    def parse(self, value: object, method: str) -> object:
        """Coerce ``value`` (a string from the CLI, or a config value) to the default's type and check it."""
        where = f"method {method!r}, option {self.name!r}"
        if isinstance(self.default, float):
            try:
                number = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{where}: expected a number, got {value!r}") from None
            low_ok = number > 0 if self.positive else number >= 0
            if not (number == number and abs(number) != float("inf") and low_ok):
                raise ValueError(f"{where}: must be a finite number {'> 0' if self.positive else '>= 0'}, got {value!r}")
            return number
        value = str(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where}: must be one of {list(self.choices)}, got {value!r}")
        return value


@dataclass(frozen=True)
class Reweighting:
    """A registered method: its per-pair weights, its options and (optionally) a parameter-space step.

    ``rebalance``, when set, is applied by the training loop after backward to the
    step's recorded chosen/rejected gradient pieces (see ``gradlens.balance``).
    """

    name: str
    weights: Callable[[PairContext], Weights]
    options: tuple[Option, ...] = ()
    rebalance: Callable | None = None

    def resolve_options(self, given: Mapping[str, object]) -> dict[str, object]:
        """Defaults overridden by ``given``; an option the method does not have is an error."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            offer = ", ".join(sorted(known)) or "none"
            raise ValueError(f"method {self.name!r} has no option {unknown[0]!r}; its options: {offer}")
        return {name: known[name].parse(given[name], self.name) if name in given else o.default for name, o in known.items()}


REWEIGHTINGS: dict[str, Reweighting] = {}


def register_reweighting(name: str, *, options: tuple[Option, ...] = (), rebalance: Callable | None = None):
    """Register ``fn(ctx) -> (beta_w, beta_l, a_w, a_l)`` under ``name``; a duplicate name raises.

    ``options`` are the settings ``fn`` reads from ``ctx.options``; ``rebalance``
    is a parameter-space step on the recorded gradient pieces (``gradlens.balance``).
    The function is returned unchanged, so it can still be called directly.
    """

    def decorate(fn: Callable[[PairContext], Weights]):
        if name in REWEIGHTINGS:
            raise ValueError(f"reweighting {name!r} is already registered")
        REWEIGHTINGS[name] = Reweighting(name, fn, tuple(options), rebalance)
        return fn

    return decorate


def get_reweighting(name: str) -> Reweighting:
    """The registered method ``name``; an unknown name lists the registry."""
    if name not in REWEIGHTINGS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(REWEIGHTINGS)}")
    return REWEIGHTINGS[name]


@dataclass(frozen=True)
class LossSpec:
    """A registered method with its options resolved: every declared option present, parsed and checked.

    Built once by ``resolve_loss``; the options mapping is read-only.
    """

    method: Reweighting
    options: Mapping[str, object]

    @property
    def name(self) -> str:
        return self.method.name


def resolve_loss(name: str, options: Mapping[str, object] | None = None) -> LossSpec:
    """Method ``name`` from the registry with ``options`` (CLI strings or typed values) over its defaults.

    An unknown method lists the registry; an option the method does not declare, or a bad value,
    is an error naming the method and the option.
    """
    method = get_reweighting(name)
    return LossSpec(method, MappingProxyType(method.resolve_options(dict(options or {}))))


BALANCE_SPACE = Option(
    "balance_space", "sequence", "weights from sequence log-probs or per-token means (needs completion lengths)",
    choices=("sequence", "token_mean"),
)  # fmt: skip
ADADPO_CAP = Option("adadpo_cap", 2.0, "AdaDPO cap C on p_w/p_l", positive=True)
TAU = Option("tau", 0.5, "exponent τ of a_w ∝ p_w^τ, a_l ∝ p_l^τ (0 = DPO, 1 = Balanced-DPO)")
BALANCE_SCOPE = Option(
    "balance_scope", "global", "equalise the chosen/rejected piece norms over the whole model or per parameter tensor",
    choices=("global", "per_layer"),
)  # fmt: skip


def _ones(ctx: PairContext) -> Weights:
    ones = torch.ones_like(ctx.u)
    return ctx.beta * ones, ctx.beta * ones, ones, ones


def _log_ratio(ctx: PairContext) -> torch.Tensor:
    """ℓ_w − ℓ_l in the option's space: whole sequences or per-token means."""
    space = ctx.options.get("balance_space", "sequence")
    if space == "sequence":
        return ctx.chosen_logps - ctx.rejected_logps
    if space == "token_mean":
        if ctx.chosen_lengths is None or ctx.rejected_lengths is None:
            raise ValueError("balance_space='token_mean' needs chosen_lengths and rejected_lengths (completion token counts)")
        return ctx.chosen_logps / ctx.chosen_lengths - ctx.rejected_logps / ctx.rejected_lengths
    raise ValueError(f"balance_space must be 'sequence' or 'token_mean', got {space!r}")


register_reweighting("dpo")(_ones)


@register_reweighting("balanced", options=(BALANCE_SPACE,))
def _balanced(ctx: PairContext) -> Weights:
    diff = _log_ratio(ctx)
    ones = torch.ones_like(ctx.u)
    return ctx.beta * ones, ctx.beta * ones, 2 * torch.sigmoid(diff), 2 * torch.sigmoid(-diff)


@register_reweighting("power", options=(TAU, BALANCE_SPACE))
def _power(ctx: PairContext) -> Weights:
    # a_w / a_l = (p_w / p_l)^τ and a_w + a_l = 2  =>  a_w = 2σ(τ(ℓ_w − ℓ_l)).
    diff = float(ctx.options.get("tau", TAU.default)) * _log_ratio(ctx)
    ones = torch.ones_like(ctx.u)
    return ctx.beta * ones, ctx.beta * ones, 2 * torch.sigmoid(diff), 2 * torch.sigmoid(-diff)


@register_reweighting("adadpo", options=(ADADPO_CAP,))
def _adadpo(ctx: PairContext) -> Weights:
    cap = float(ctx.options.get("adadpo_cap", 2.0))
    ratio = torch.exp(ctx.chosen_logps - ctx.rejected_logps)  # p_w / p_l
    ones = torch.ones_like(ctx.u)
    return ctx.beta * torch.clamp(ratio, max=cap), ctx.beta * ones, ones, ones


register_reweighting("norm_balanced", options=(BALANCE_SCOPE,), rebalance=rebalance_capture)(_ones)


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """``rewards/accuracies``: the share of pairs with r_chosen > r_rejected, or NaN when a reward is NaN
    (a comparison with NaN is no answer, and a plain fraction would count it as a wrong one)."""
    if bool(torch.isnan(chosen_rewards).any() or torch.isnan(rejected_rewards).any()):
        return float("nan")
    return (chosen_rewards > rejected_rewards).double().mean().item()


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

    def metrics(self) -> dict[str, float]:
        """Batch means under TRL's names (plus gradlens's own)."""
        return {
            names.LOSS: self.dpo_loss.item(),
            names.REWARDS_CHOSEN: self.chosen_rewards.mean().item(),
            names.REWARDS_REJECTED: self.rejected_rewards.mean().item(),
            names.REWARDS_MARGINS: self.margins.mean().item(),
            names.REWARDS_ACCURACIES: reward_accuracy(self.chosen_rewards, self.rejected_rewards),
            names.LOG_PW_OVER_PL: self.log_pw_over_pl.mean().item(),
            names.SIGMOID_NEG_U: self.sigmoid_neg_u.mean().item(),
            names.WEIGHT_CHOSEN: self.weight_chosen.mean().item(),
            names.WEIGHT_REJECTED: self.weight_rejected.mean().item(),
        }


def _check_shapes(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"log-probabilities must all be 1-D tensors of the same length B; got shapes {shapes}")


def _loss_spec(method: str | LossSpec, *, options: Mapping[str, object] | None, **keywords: object) -> LossSpec:
    """``method`` as a LossSpec; a LossSpec already carries its options, so none may be given beside it."""
    given = {k: v for k, v in keywords.items() if v is not None}
    if isinstance(method, LossSpec):
        if given or options:
            raise ValueError(f"method {method.name!r} is a resolved LossSpec: set its options in resolve_loss, not in preference_loss")
        return method
    declared = {o.name for o in get_reweighting(method).options}
    return resolve_loss(method, {**{k: v for k, v in given.items() if k in declared}, **(options or {})})


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    method: str | LossSpec = "dpo",
    balance_space: str | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    adadpo_cap: float | None = None,
    options: Mapping[str, object] | None = None,
) -> PreferenceLossOutput:
    """A registered method's loss from summed completion log-probs of shape (B,).

    ``method``: a ``LossSpec`` from ``resolve_loss`` (options resolved once, used as
    they are), or a method's name, whose options are then resolved here from
    ``options`` (``REWEIGHTINGS[method].options``) and the keywords
    ``balance_space`` and ``adadpo_cap``, which reach only the methods that declare
    them (unset: the registry's defaults, "sequence" and 2). For methods with
    weights 1 (``dpo``, ``norm_balanced``) ``.loss`` is the DPO loss itself.

    NaN inputs propagate: the loss becomes NaN and ``.nonfinite`` is True; nothing
    is replaced or dropped.
    """
    spec = _loss_spec(method, balance_space=balance_space, adadpo_cap=adadpo_cap, options=options)
    rw, resolved = spec.method, spec.options
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
        options=resolved,
    )
    beta_w, beta_l, a_w, a_l = (t.detach() for t in rw.weights(ctx))
    coeff = torch.sigmoid(-u.detach())
    if rw.weights is _ones:
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
