"""The DPO-family losses against their closed forms (docs/recording.md, Losses)."""

from __future__ import annotations

import pytest
import torch

import gradlens
from gradlens.losses import REWEIGHTINGS, register_reweighting

B, BETA = 5, 0.3


def logps(seed=0):
    g = torch.Generator().manual_seed(seed)
    lw, ll = (-torch.rand(B, generator=g, dtype=torch.float64) * 20 for _ in range(2))
    rw, rl = (-torch.rand(B, generator=g, dtype=torch.float64) * 20 for _ in range(2))
    return lw.requires_grad_(), ll.requires_grad_(), rw, rl


def grads(method, **kw):
    lw, ll, rw, rl = logps()
    out = gradlens.preference_loss(lw, ll, rw, rl, beta=BETA, method=method, **kw)
    gw, gl = torch.autograd.grad(out.loss, (lw, ll))
    u = BETA * ((lw - rw) - (ll - rl)).detach()
    return out, gw, gl, u, lw.detach(), ll.detach()


@pytest.mark.parametrize("method", ["dpo", "balanced", "adadpo"])
def test_dpo_loss_value_is_mean_neg_log_sigmoid(method):
    out, _, _, u, _, _ = grads(method)
    torch.testing.assert_close(out.dpo_loss, (-torch.log(torch.sigmoid(u))).mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(out.u, u)
    torch.testing.assert_close(out.margins, out.chosen_rewards - out.rejected_rewards)


def test_dpo_gradient_closed_form():
    out, gw, gl, u, _, _ = grads("dpo")
    s = torch.sigmoid(-u)
    torch.testing.assert_close(gw, -BETA * s / B, rtol=1e-13, atol=0)
    torch.testing.assert_close(gl, BETA * s / B, rtol=1e-13, atol=0)
    assert out.loss is not None and torch.equal(out.loss.detach(), out.dpo_loss)


def test_balanced_gradient_closed_form_and_weight_identities():
    out, gw, gl, u, lw, ll = grads("balanced")
    s = torch.sigmoid(-u)
    a_w, a_l = 2 * torch.sigmoid(lw - ll), 2 * torch.sigmoid(ll - lw)
    torch.testing.assert_close(gw, -BETA * s * a_w / B, rtol=1e-13, atol=0)
    torch.testing.assert_close(gl, BETA * s * a_l / B, rtol=1e-13, atol=0)
    torch.testing.assert_close(out.weight_chosen + out.weight_rejected, torch.full((B,), 2.0, dtype=torch.float64))
    # a_w / p_w = a_l / p_l: equal probability-space sensitivities (in log space)
    torch.testing.assert_close(torch.log(out.weight_chosen) - lw, torch.log(out.weight_rejected) - ll, rtol=1e-12, atol=1e-12)


def test_balanced_token_mean_space():
    nw, nl = torch.arange(1, B + 1, dtype=torch.float64), torch.arange(B + 1, 1, -1, dtype=torch.float64)
    out, gw, gl, u, lw, ll = grads("balanced", balance_space="token_mean", chosen_lengths=nw, rejected_lengths=nl)
    a_w = 2 * torch.sigmoid(lw / nw - ll / nl)
    torch.testing.assert_close(gw, -BETA * torch.sigmoid(-u) * a_w / B, rtol=1e-13, atol=0)
    torch.testing.assert_close(gl, BETA * torch.sigmoid(-u) * (2 - a_w) / B, rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="chosen_lengths"):
        grads("balanced", balance_space="token_mean")
    with pytest.raises(ValueError, match="balance_space"):
        grads("balanced", balance_space="nope")


def test_adadpo_gradient_closed_form():
    out, gw, gl, u, lw, ll = grads("adadpo")
    s = torch.sigmoid(-u)
    beta_w = BETA * torch.clamp(torch.exp(lw - ll), max=2.0)
    torch.testing.assert_close(gw, -beta_w * s / B, rtol=1e-13, atol=0)
    torch.testing.assert_close(gl, BETA * s / B, rtol=1e-13, atol=0)


def test_metrics_use_trl_names():
    out, *_ = grads("balanced")
    m = out.metrics()
    for key in ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "log_pw_over_pl", "sigmoid_neg_u", "weights/chosen", "weights/rejected"]:
        assert key in m


def test_nan_logps_propagate_and_are_flagged():
    lw, ll, rw, rl = logps()
    out = gradlens.preference_loss(lw, ll.detach() * float("nan"), rw, rl, method="balanced")
    assert out.nonfinite and torch.isnan(out.loss) and torch.isnan(out.dpo_loss)
    assert torch.isnan(out.u).all()


def test_bad_input():
    lw, ll, rw, rl = logps()
    with pytest.raises(ValueError, match="same length"):
        gradlens.preference_loss(lw, ll[:-1], rw, rl)
    with pytest.raises(ValueError, match="1-D"):
        gradlens.preference_loss(lw[None], ll[None], rw[None], rl[None])
    with pytest.raises(ValueError, match="unknown method"):
        gradlens.preference_loss(lw, ll, rw, rl, method="ipo")
    with pytest.raises(ValueError, match="beta"):
        gradlens.preference_loss(lw, ll, rw, rl, beta=0)


def test_registering_a_method_is_one_function():
    @register_reweighting("half_rejected")
    def half(ctx):
        ones = torch.ones_like(ctx.u)
        return ctx.beta * ones, ctx.beta * ones, ones, 0.5 * ones

    try:
        out, gw, gl, u, _, _ = grads("half_rejected")
        torch.testing.assert_close(gl, 0.5 * BETA * torch.sigmoid(-u) / B)
        with pytest.raises(ValueError, match="already registered"):
            register_reweighting("half_rejected")(half)
    finally:
        REWEIGHTINGS.pop("half_rejected")


@pytest.mark.parametrize("tau", [0.0, 0.25, 0.5, 1.0])
def test_power_family_closed_form(tau):
    """a_w ∝ p_w^τ, a_l ∝ p_l^τ, a_w + a_l = 2: a_w = 2σ(τ(ℓ_w − ℓ_l)); τ = 0 is DPO, τ = 1 Balanced-DPO."""
    out, gw, gl, u, lw, ll = grads("power", options={"tau": tau})
    s = torch.sigmoid(-u)
    a_w = 2 * torch.sigmoid(tau * (lw - ll))
    torch.testing.assert_close(gw, -BETA * s * a_w / B, rtol=1e-13, atol=0)
    torch.testing.assert_close(gl, BETA * s * (2 - a_w) / B, rtol=1e-13, atol=1e-15)
    # the ratio of the weights is (p_w / p_l)^τ
    torch.testing.assert_close(torch.log(out.weight_chosen) - torch.log(out.weight_rejected), tau * (lw - ll), rtol=1e-12, atol=1e-12)
    same = {0.0: "dpo", 1.0: "balanced"}.get(tau)
    if same:
        _, gw2, gl2, *_ = grads(same)
        torch.testing.assert_close(gw, gw2, rtol=1e-13, atol=0)
        torch.testing.assert_close(gl, gl2, rtol=1e-13, atol=0)


def test_method_options_come_from_the_registry():
    with pytest.raises(ValueError, match="has no option 'tau'.*balance_space"):
        grads("balanced", options={"tau": 0.5})
    with pytest.raises(ValueError, match="option 'tau'.*>= 0"):
        grads("power", options={"tau": -1})
    with pytest.raises(ValueError, match="option 'balance_scope'.*per_layer"):
        grads("norm_balanced", options={"balance_scope": "rows"})
    assert REWEIGHTINGS["power"].resolve_options({"tau": "0.25"}) == {"tau": 0.25, "balance_space": "sequence"}
    # the DPO-weight methods keep DPO's own loss
    out, *_ = grads("norm_balanced")
    assert torch.equal(out.loss.detach(), out.dpo_loss)


def test_a_registered_method_is_offered_by_the_cli_with_its_options():
    from gradlens.losses import Option
    from gradlens.record.config import RecordConfig, loss_names, parse_loss_options, resolve

    @register_reweighting("scaled_rejected", options=(Option("scale", 0.5, "weight of the rejected term", positive=True),))
    def scaled(ctx):
        ones = torch.ones_like(ctx.u)
        return ctx.beta * ones, ctx.beta * ones, ones, float(ctx.options["scale"]) * ones

    try:
        assert "scaled_rejected" in loss_names()
        options = parse_loss_options(["scale=0.25"])
        (cfg,) = resolve({}, {"env": "tabular", "loss": ("scaled_rejected",), "loss_options": options})
        assert cfg.loss == "scaled_rejected" and cfg.loss_options == {"scale": 0.25}
        dpo, power = resolve({}, {"env": "tabular", "loss": ("dpo", "power"), "loss_options": {"tau": "0.5"}})
        assert dpo.loss_options == {} and power.loss_options == {"tau": 0.5}  # each run gets the options its method has
        with pytest.raises(ValueError, match="no requested loss has this option"):
            resolve({}, {"env": "tabular", "loss": ("dpo",), "loss_options": {"scale": "1"}})
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            parse_loss_options(["scale"])
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            resolve({}, {"env": "tabular", "loss": ("scaled_rejected",), "loss_options": {"scale": "0"}})
        assert RecordConfig().loss_options == {}
    finally:
        REWEIGHTINGS.pop("scaled_rejected")


def test_a_loss_spec_is_resolved_once_and_used_as_it_is():
    from types import MappingProxyType

    from gradlens.losses import LossSpec, resolve_loss

    spec = resolve_loss("power", {"tau": "0.25", "balance_space": "token_mean"})
    assert isinstance(spec, LossSpec) and spec.name == "power" and spec.method is REWEIGHTINGS["power"]
    assert dict(spec.options) == {"tau": 0.25, "balance_space": "token_mean"}
    assert isinstance(spec.options, MappingProxyType)  # read-only: nothing downstream can change it
    assert dict(resolve_loss("balanced").options) == {"balance_space": "sequence"}  # the registry's defaults
    lengths = torch.tensor([3.0, 5.0, 2.0, 7.0, 4.0], dtype=torch.float64)
    kw = dict(chosen_lengths=lengths, rejected_lengths=lengths.flip(0))
    by_spec, gw, gl, *_ = grads(spec, **kw)
    by_name, gw2, gl2, *_ = grads("power", options={"tau": 0.25}, balance_space="token_mean", **kw)
    assert torch.equal(by_spec.loss, by_name.loss) and torch.equal(gw, gw2) and torch.equal(gl, gl2)
    assert torch.equal(by_spec.weight_chosen, by_name.weight_chosen)
    with pytest.raises(ValueError, match="resolved LossSpec: set its options in resolve_loss"):
        grads(spec, options={"tau": 0.5})
    with pytest.raises(ValueError, match="resolved LossSpec"):
        grads(spec, balance_space="sequence")
    with pytest.raises(ValueError, match="method 'balanced' has no option 'tau'"):
        resolve_loss("balanced", {"tau": 1})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        resolve_loss("nope")


def test_record_resolves_the_loss_options_once_not_every_step(tmp_path, monkeypatch):
    from gradlens.cli import main
    from gradlens.losses import Reweighting

    calls = []
    real = Reweighting.resolve_options
    monkeypatch.setattr(Reweighting, "resolve_options", lambda self, given: calls.append(self.name) or real(self, given))
    counts = {}
    for steps in (2, 5):
        calls.clear()
        args = ["record", "--env", "tabular", "--loss", "power", "--loss-option", "tau=0.25", "--steps", str(steps), "--batch-size", "4"]
        assert main([*args, "--out", str(tmp_path / f"s{steps}"), "--quiet", "--no-tensorboard"]) == 0
        counts[steps] = len(calls)
    assert counts[2] == counts[5] >= 1, counts  # the same number for 2 and 5 steps: none per step
