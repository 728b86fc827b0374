"""The recorder's chosen/rejected split against independent references.

Reference: one forward, then separate ``torch.autograd.grad`` passes that pull the
loss's row weights back through the chosen rows only and the rejected rows only.
Rows are independent through the model, so these are the exact group gradients.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import gradlens
from models import MODELS, VOCAB, sequence_logps

B, T, PROMPT = 3, 9, 4
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def make_batch(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2 * B, T), generator=g)
    ids[B:, :PROMPT] = ids[:B, :PROMPT]  # chosen and rejected share the prompt
    return ids


def loss_of(logps: torch.Tensor, method: str):
    g = torch.Generator().manual_seed(1)
    ref = logps.detach() + 0.3 * torch.randn(logps.shape, generator=g, dtype=logps.dtype)
    return gradlens.preference_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=0.5, method=method).loss


def reference_split(model, ids, method):
    """(g_chosen, g_rejected) as flat vectors over unique parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    lp = sequence_logps(model, ids, PROMPT)
    (w,) = torch.autograd.grad(loss_of(lp, method), lp, retain_graph=True)
    parts = []
    for rows in (slice(0, B), slice(B, 2 * B)):
        grads = torch.autograd.grad(lp[rows], params, grad_outputs=w[rows], retain_graph=True, allow_unused=True)
        parts.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return parts


def recorded(model, ids, method, **capture_kwargs):
    rec = gradlens.GradientRecorder(model)
    model.zero_grad(set_to_none=True)
    lp = sequence_logps(model, ids, PROMPT)
    with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}, **capture_kwargs) as cap:
        loss_of(lp, method).backward()
    rec.close()
    return cap


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["dpo", "balanced", "adadpo"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "custom"])
def test_split_matches_separate_autograd_passes(family, method, dtype):
    model = MODELS[family](dtype)
    ids = make_batch()
    torch.manual_seed(5)  # same dropout masks for the reference and the recorded pass
    gc, gr = reference_split(model, ids, method)
    torch.manual_seed(5)
    cap = recorded(model, ids, method)
    tol = TOL[dtype]
    assert not cap.unattributed
    assert rel(cap.norm("chosen"), gc.norm().item()) <= tol
    assert rel(cap.norm("rejected"), gr.norm().item()) <= tol
    assert rel(cap.dot("chosen", "rejected"), (gc @ gr).item()) <= tol * 10  # dot may cancel; scale by norms below
    assert abs(cap.dot("chosen", "rejected") - (gc @ gr).item()) <= tol * gc.norm().item() * gr.norm().item()
    assert rel(cap.norm(), (gc + gr).norm().item()) <= tol
    assert rel(cap.cosine("chosen", "rejected"), (gc @ gr / (gc.norm() * gr.norm())).item()) <= tol * 10
    identity = cap.norm("chosen") ** 2 + cap.norm("rejected") ** 2 + 2 * cap.dot("chosen", "rejected")
    assert rel(identity, cap.norm() ** 2) <= tol


def test_paths_cover_every_rule():
    paths = {f: set(gradlens.GradientRecorder(MODELS[f]()).paths().values()) for f in MODELS}
    assert paths["gpt2"] == {"embedding", "conv1d", "layernorm", "linear"}  # lm_head (tied to wte) is an nn.Linear
    assert paths["llama"] == {"embedding", "linear", "rmsnorm"}
    assert paths["custom"] == {"embedding", "fallback", "layernorm", "linear"}


def test_per_layer_reports_path_and_sums_to_totals():
    model = MODELS["gpt2"](torch.float64)
    cap = recorded(model, make_batch(), "dpo")
    table = cap.per_layer()
    assert {"name", "module", "path", "sq_norm/chosen", "sq_norm/rejected", "dot/chosen/rejected"} <= set(table.columns)
    tied = table[table.name == "transformer.wte.weight"].iloc[0]
    assert set(tied.module.split(",")) == {"transformer.wte", "lm_head"}
    assert tied.path == "embedding+linear" and tied.uses == 2
    assert math.isclose(table["sq_norm/chosen"].sum(), cap.norm("chosen") ** 2, rel_tol=1e-12)
    layers = cap.layer_table()
    assert math.isclose(sum(v["rejected_sq"] for v in layers.values()), cap.norm("rejected") ** 2, rel_tol=1e-12)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant):
    model = MODELS["gpt2"](torch.float64).train()
    ids = make_batch()
    gc, gr = reference_split(copy.deepcopy(model), ids, "balanced")  # reentrant checkpointing forbids autograd.grad
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    cap = recorded(model, ids, "balanced")
    assert rel(cap.norm("chosen"), gc.norm().item()) <= 1e-10
    assert rel(cap.norm("rejected"), gr.norm().item()) <= 1e-10


def test_verify_mode_computes_every_group_and_agrees():
    model = MODELS["llama"](torch.float64)
    ids = make_batch()
    fast, slow = recorded(model, ids, "dpo"), recorded(model, ids, "dpo", verify=True)
    for g in ("chosen", "rejected"):
        assert rel(fast.norm(g), slow.norm(g)) <= 1e-10


def grads_with_and_without_recorder(family, **recorder_kwargs):
    ids = make_batch()
    grads = []
    for use_recorder in (False, True):
        model = MODELS[family](torch.float32)
        rec = gradlens.GradientRecorder(model, **recorder_kwargs) if use_recorder else None
        torch.manual_seed(3)
        lp = sequence_logps(model, ids, PROMPT)
        loss = loss_of(lp, "balanced")
        if use_recorder:
            with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}) as cap:
                loss.backward()
            rec.close()
            assert not cap.unattributed
        else:
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


@pytest.mark.parametrize("family", ["gpt2", "llama", "custom"])
def test_grads_bit_identical_without_split_backward(family):
    for a, b in zip(*grads_with_and_without_recorder(family, split_backward=False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["gpt2", "llama", "custom"])
def test_split_backward_grads_equal_up_to_float32_rounding(family):
    """The default splits each linear layer's weight-gradient reduction by group: the same
    sum in another order. Bound: every parameter's gradient within 1e-6 of its norm
    (float32 rounding of a two-term sum), and run to run the split is deterministic."""
    plain, split = grads_with_and_without_recorder(family)
    _, again = grads_with_and_without_recorder(family)
    for a, b, c in zip(plain, split, again):
        assert (a - b).norm() <= 1e-6 * a.norm() + 1e-12
        assert torch.equal(b, c)


def test_close_removes_every_hook():
    model = MODELS["custom"]()
    before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    rec = gradlens.GradientRecorder(model)
    assert any(len(m._forward_hooks) for m in model.modules())
    rec.close()
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == before
    assert all(not p._backward_hooks for p in model.parameters())
