"""Recorder features beyond the two-group split: per-row norms, any groups, accumulation,
autocast, fused-kernel detection, NaN reporting and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

import gradlens
from gradlens.gradients import UnattributedGradientWarning
from models import MODELS, VOCAB, reference_pieces, sequence_logps

B, T, PROMPT = 3, 8, 3


def batch(n=2 * B, seed=0):
    return torch.randint(2, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def weights(n, seed=1, dtype=torch.float64):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def group_grad(model, ids, w, rows):
    """Reference: autograd.grad of Σ_{i in rows} w_i ℓ_i."""
    params = list(model.parameters())
    lp = sequence_logps(model, ids, PROMPT)
    grads = torch.autograd.grad((lp[rows] * w[rows]).sum(), params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


@pytest.mark.parametrize("family", ["gpt2", "llama", "custom"])
def test_per_row_norms_match_torch_func(family):
    model = MODELS[family](torch.float64).eval()  # eval: no dropout, so vmap sees the same function
    ids, w = batch(), weights(2 * B)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def row_objective(p, row_ids, wi):
        logits = logits_of_functional(model, p, row_ids[None])
        logp = F.log_softmax(logits[:, :-1], -1).gather(-1, row_ids[None, 1:, None]).squeeze(-1)
        return wi * logp[:, PROMPT - 1 :].sum()

    per_row = vmap(grad(row_objective), in_dims=(None, 0, 0))(params, ids, w)
    expected = torch.sqrt(sum(g.reshape(2 * B, -1).pow(2).sum(1) for g in per_row.values()))

    rec = gradlens.GradientRecorder(model)
    lp = sequence_logps(model, ids, PROMPT)
    with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}, per_row=True) as cap:
        (lp * w).sum().backward()
    torch.testing.assert_close(cap.per_row_norms(), expected, rtol=1e-10, atol=0)


def logits_of_functional(model, params, ids):
    out = functional_call(model, params, (ids,))
    return out.logits if hasattr(out, "logits") else out


def test_index_groups_three_groups_and_ignored_rows():
    model = MODELS["llama"](torch.float64)
    n = 7
    ids, w = batch(n), weights(n)
    groups = {"a": torch.tensor([0, 3]), "b": torch.tensor([5, 1]), "c": slice(6, 7)}  # rows 2 and 4 in no group
    rec = gradlens.GradientRecorder(model)
    lp = sequence_logps(model, ids, PROMPT)
    with rec.capture(groups=groups, num_rows=n) as cap:
        (lp * w).sum().backward()
    refs = {name: group_grad(model, ids, w, torch.as_tensor(rows) if not isinstance(rows, slice) else rows) for name, rows in groups.items()}
    for name, ref in refs.items():
        assert math.isclose(cap.norm(name), ref.norm().item(), rel_tol=1e-10)
    assert math.isclose(cap.dot("a", "c"), (refs["a"] @ refs["c"]).item(), rel_tol=1e-9)
    assert math.isclose(cap.dot("c", "b"), (refs["b"] @ refs["c"]).item(), rel_tol=1e-9)
    # norm() is the whole gradient, including the ignored rows
    assert math.isclose(cap.norm(), group_grad(model, ids, w, slice(0, n)).norm().item(), rel_tol=1e-10)


def test_accumulation_over_micro_batches_with_a_smaller_last_one():
    model = MODELS["gpt2"](torch.float64)
    full_ids, w = batch(10), weights(10)
    # pairs 0..4: chosen rows 0..4, rejected rows 5..9 in the full batch; micro-batches of 3 and 2 pairs
    chosen_ref = group_grad(model, full_ids, w, slice(0, 5))
    rejected_ref = group_grad(model, full_ids, w, slice(5, 10))
    rec = gradlens.GradientRecorder(model)
    with rec.capture(groups={"chosen": slice(0, 3), "rejected": slice(3, 6)}, accumulate=True) as cap:
        for k, (lo, hi) in enumerate([(0, 3), (3, 5)]):
            rows = list(range(lo, hi)) + list(range(5 + lo, 5 + hi))
            m = hi - lo
            if k:
                cap.set_groups({"chosen": slice(0, m), "rejected": slice(m, 2 * m)})
            lp = sequence_logps(model, full_ids[rows], PROMPT)
            (lp * w[rows]).sum().backward()
    assert math.isclose(cap.norm("chosen"), chosen_ref.norm().item(), rel_tol=1e-10)
    assert math.isclose(cap.norm("rejected"), rejected_ref.norm().item(), rel_tol=1e-10)


def test_a_second_backward_needs_accumulate():
    model = MODELS["gpt2"](torch.float32)
    ids, w = batch(), weights(2 * B, dtype=torch.float32)
    rec = gradlens.GradientRecorder(model)
    with pytest.raises(RuntimeError, match="accumulate=True"):
        with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}):
            (sequence_logps(model, ids, PROMPT) * w).sum().backward()
            (sequence_logps(model, ids, PROMPT) * w).sum().backward()
    with pytest.raises(ValueError, match="accumulate=True"):
        with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}) as cap:
            (sequence_logps(model, ids, PROMPT) * w).sum().backward()
            cap.set_groups({"chosen": slice(0, B), "rejected": slice(B, 2 * B)})


def test_bf16_autocast_accumulates_in_float32():
    model = MODELS["llama"](torch.float32)
    ids, w = batch(), weights(2 * B, dtype=torch.float32)
    rec = gradlens.GradientRecorder(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = sequence_logps(model, ids, PROMPT).float()
    with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}, verify=True) as cap:
        (lp * w).sum().backward()
    assert not cap.unattributed
    assert all(math.isfinite(cap.norm(g)) and cap.norm(g) > 0 for g in ("chosen", "rejected"))
    # the split still adds up: the identity is exact up to float32 rounding
    identity = cap.norm("chosen") ** 2 + cap.norm("rejected") ** 2 + 2 * cap.dot("chosen", "rejected")
    assert math.isclose(identity, cap.norm() ** 2, rel_tol=1e-4)


class FusedHeadLM(torch.nn.Module):
    """Like TRL's fused LM head: the tied weight is read directly, lm_head.forward never runs."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.lm_head = torch.nn.Linear(8, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return F.linear(torch.tanh(self.embed(ids)), self.lm_head.weight)


def test_fused_kernel_use_is_detected_and_left_out():
    model = FusedHeadLM().double()
    ids, w = batch(), weights(2 * B)
    rec = gradlens.GradientRecorder(model)
    lp = sequence_logps(model, ids, PROMPT)
    with pytest.warns(UnattributedGradientWarning, match="embed.weight"):
        with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}) as cap:
            (lp * w).sum().backward()
    assert set(cap.unattributed) == {"embed.weight"}
    assert cap.per_layer().set_index("name").loc["embed.weight", "path"] == "unattributed"
    assert cap.norm("chosen") == 0.0  # the only parameter is unattributed: nothing is counted silently


def test_nan_gradients_are_reported_not_dropped():
    model = MODELS["gpt2"](torch.float32)
    ids = batch()
    rec = gradlens.GradientRecorder(model)
    lp = sequence_logps(model, ids, PROMPT)
    out = gradlens.preference_loss(lp[:B], lp[B:] * float("nan"), lp[:B].detach(), lp[B:].detach())
    assert out.nonfinite and math.isnan(out.loss.item())
    with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}) as cap:
        out.loss.backward()
    assert math.isnan(cap.norm("rejected")) and math.isnan(cap.norm())
    assert not cap.unattributed


@pytest.mark.parametrize(
    "groups, num_rows, message",
    [
        ({"a": slice(0, 3), "b": slice(2, 5)}, None, "overlap"),
        ({"a": slice(0, 3), "b": slice(3, 9)}, 6, "out of range"),
        ({"a": torch.tensor([0, -1])}, None, "negative"),
        ({"a": slice(3, 3), "b": torch.tensor([], dtype=torch.long)}, None, "every row group is empty"),
        ({"a": torch.tensor([[0, 1]])}, None, "1-D"),
        ({}, None, "at least one"),
    ],
)
def test_bad_groups_raise_clear_errors(groups, num_rows, message):
    rec = gradlens.GradientRecorder(MODELS["custom"]())
    with pytest.raises(ValueError, match=message):
        with rec.capture(groups=groups, num_rows=num_rows):
            pass


def test_groups_that_do_not_match_the_batch_raise():
    model = MODELS["custom"]().eval()
    rec = gradlens.GradientRecorder(model)
    lp = sequence_logps(model, batch(), PROMPT)
    with pytest.raises(ValueError, match="sees a batch of 6 rows"):
        with rec.capture(groups={"chosen": slice(0, 2), "rejected": slice(2, 4)}):
            lp.sum().backward()


def test_queries_before_the_block_ends_and_closed_recorder():
    model = MODELS["custom"]().eval()
    rec = gradlens.GradientRecorder(model)
    with rec.capture(groups={"chosen": slice(0, B), "rejected": slice(B, 2 * B)}) as cap:
        with pytest.raises(RuntimeError, match="still open"):
            cap.norm("chosen")
    with pytest.raises(ValueError, match="unknown group"):
        cap.norm("nope")
    rec.close()
    with pytest.raises(RuntimeError, match="closed"):
        with rec.capture(groups={"a": slice(0, 1)}):
            pass


@pytest.mark.parametrize("family", ["gpt2", "llama", "custom"])
def test_an_empty_group_records_zero_and_the_others_stay_exact(family):
    """A micro-batch may hold no row of a group (no negative-advantage completion): that group's piece
    is zero, the others equal separate autograd passes. (An empty *last* group of a partition is taken as
    the total minus the others: float rounding, not zero; the run logs report it as zero from the row counts.)"""
    model = MODELS[family]()
    if family != "custom":
        model.eval()
    ids, w = batch(), torch.randn(6)
    empty = torch.tensor([], dtype=torch.long)
    for groups in ({"p": torch.tensor([0, 2, 4]), "n": empty, "z": torch.tensor([1, 3, 5])},
                   {"p": empty, "z": torch.tensor([0, 1, 2]), "n": torch.tensor([3, 4, 5])}):  # fmt: skip
        rec = gradlens.GradientRecorder(model)
        torch.manual_seed(1)
        with rec.capture(groups=groups, keep_pieces=True) as cap:
            (sequence_logps(model, ids, PROMPT) * w).sum().backward()
        rec.close()
        torch.manual_seed(1)
        ref = reference_pieces(model, sequence_logps(model, ids, PROMPT), w, groups)
        model.zero_grad()
        for g, rows in groups.items():
            scale = math.sqrt(sum(float(t.pow(2).sum()) for t in ref[g].values()))
            if len(rows) == 0:
                assert scale == 0 and cap.norm(g) == 0
                continue
            pieces = cap.pieces(g)
            err = math.sqrt(sum(float((pieces[n] - t).pow(2).sum()) for n, t in ref[g].items() if n in pieces))
            assert scale > 0 and err <= 1e-5 * scale and abs(cap.norm(g) - scale) <= 1e-5 * scale
