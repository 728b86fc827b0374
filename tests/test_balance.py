"""norm_balanced: the applied update against two separate autograd.grad passes.

Reference: the chosen piece g_c is the DPO loss's gradient through the chosen rows
only (a forward of the chosen rows, the rejected log-probs detached), and g_r
likewise; the expected update is m (g_c/‖g_c‖ + g_r/‖g_r‖), m = (‖g_c‖ + ‖g_r‖)/2,
with norms over the whole model (global) or per parameter tensor (per_layer).
Tolerance: float64 models, rtol 1e-9 (the recorder splits the same sums in a
different order).
"""

from __future__ import annotations

import math

import pytest
import torch

from gradlens.balance import rebalance_pieces
from gradlens.gradients import GradientRecorder
from gradlens.losses import REWEIGHTINGS, preference_loss
from models import MODELS, VOCAB, sequence_logps

B, T, PROMPT, BETA = 3, 7, 3, 0.5


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, VOCAB, (B, PROMPT), generator=g)
    completions = torch.randint(1, VOCAB, (2 * B, T - PROMPT), generator=g)
    return torch.cat([torch.cat([prompt, prompt]), completions], dim=1)  # (2B, T): chosen rows, then rejected


def _loss(logps_c, logps_r):
    ref = torch.zeros(B, dtype=torch.float64)
    return preference_loss(logps_c, logps_r, ref - 1.0, ref - 2.0, beta=BETA, method="norm_balanced").loss


def _reference_pieces(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    logps_c = sequence_logps(model, ids[:B], PROMPT)
    logps_r = sequence_logps(model, ids[B:], PROMPT)
    g_c = torch.autograd.grad(_loss(logps_c, logps_r.detach()), params, allow_unused=True)
    logps_c = sequence_logps(model, ids[:B], PROMPT)
    g_r = torch.autograd.grad(_loss(logps_c.detach(), logps_r), params, allow_unused=True)
    zero = [torch.zeros_like(p) for p in params]
    return params, [c if c is not None else z for c, z in zip(g_c, zero)], [r if r is not None else z for r, z in zip(g_r, zero)]


def _norm(ts):
    return math.sqrt(sum(float((t * t).sum()) for t in ts))


def _expected(g_c, g_r, scope):
    if scope == "global":
        nc, nr = _norm(g_c), _norm(g_r)
        m = 0.5 * (nc + nr)
        return [m / nc * c + m / nr * r for c, r in zip(g_c, g_r)]
    out = []
    for c, r in zip(g_c, g_r):
        nc, nr = _norm([c]), _norm([r])
        out.append(c + r if nc == 0 or nr == 0 else 0.5 * (nc + nr) * (c / nc + r / nr))
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "custom"])  # gpt2 ties wte and lm_head
@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_applied_update_equals_rescaled_separate_passes(family, scope):
    model = MODELS[family](torch.float64).eval()  # no dropout: the reference passes must see the same masks
    ids = _batch()
    params, g_c, g_r = _reference_pieces(model, ids)
    assert _norm(g_c) > 0 and _norm(g_r) > 0 and abs(_norm(g_c) - _norm(g_r)) > 1e-3 * _norm(g_c)  # balancing changes something

    model.zero_grad(set_to_none=True)
    rec = GradientRecorder(model)
    with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}, keep_pieces=True) as cap:
        logps = sequence_logps(model, ids, PROMPT)
        _loss(logps[:B], logps[B:]).backward()
    dpo_grad = [p.grad.clone() for p in params]
    REWEIGHTINGS["norm_balanced"].rebalance(cap, dict(model.named_parameters()), balance_scope=scope)
    rec.close()

    for p, want, dpo, c, r in zip(params, _expected(g_c, g_r, scope), dpo_grad, g_c, g_r):
        torch.testing.assert_close(dpo, c + r, rtol=1e-9, atol=1e-12)  # the recorded step is DPO's
        torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12)
    if scope == "global":  # equal piece norms, DPO's scale kept
        applied_c = [_expected(g_c, g_r, scope)[i] - (0.5 * (_norm(g_c) + _norm(g_r)) / _norm(g_r)) * g_r[i] for i in range(len(params))]
        assert _norm(applied_c) == pytest.approx(0.5 * (_norm(g_c) + _norm(g_r)), rel=1e-12)


def test_loss_is_dpo_and_nothing_to_balance_leaves_gradient():
    lw, ll = torch.tensor([-3.0, -4.0], requires_grad=True), torch.tensor([-5.0, -1.0], requires_grad=True)
    rw, rl = torch.tensor([-3.5, -4.5]), torch.tensor([-4.0, -2.0])
    nb = preference_loss(lw, ll, rw, rl, method="norm_balanced")
    dpo = preference_loss(lw, ll, rw, rl, method="dpo")
    assert torch.equal(nb.loss.detach(), dpo.loss.detach())

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([9.0, 9.0, 9.0])
    coef = rebalance_pieces([(p, torch.tensor([1.0, 2.0, 2.0]), torch.zeros(3))])  # a zero piece: unchanged sum
    assert coef == {"coef/chosen": 1.0, "coef/rejected": 1.0}
    torch.testing.assert_close(p.grad, torch.tensor([1.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="balance_scope"):
        rebalance_pieces([], scope="nope")


def test_pieces_must_be_kept():
    model = MODELS["custom"](torch.float64).eval()
    rec = GradientRecorder(model)
    with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}) as cap:
        logps = sequence_logps(model, _batch(), PROMPT)
        _loss(logps[:B], logps[B:]).backward()
    with pytest.raises(ValueError, match="not kept"):
        REWEIGHTINGS["norm_balanced"].rebalance(cap, dict(model.named_parameters()))
    rec.close()
