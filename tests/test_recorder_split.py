"""The split backward and the recorder's contract with the model: what the hooks change
(and what they must not), the probe check on split layers, the rows-are-independent
validator, and ``register_rule``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradlens
from gradlens.gradients import Rule, UnattributedGradientWarning, register_rule
from models import MODELS, VOCAB, logits_of, reference_pieces, sequence_logps

B, T, PROMPT = 3, 8, 3
GROUPS = {"chosen": slice(0, B), "rejected": slice(B, 2 * B)}


def ids_and_weights(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, VOCAB, (2 * B, T), generator=g), torch.randn(2 * B, generator=g, dtype=dtype)


def test_outputs_keep_their_values_and_close_restores_plain_graphs():
    model = MODELS["gpt2"](torch.float64).eval()
    ids, _ = ids_and_weights()
    plain = logits_of(model, ids)
    rec = gradlens.GradientRecorder(model)
    seen = {}

    def note(name):
        def hook(module, args, out):
            seen[name] = (type(out.grad_fn).__name__, tuple(out.shape))

        return hook

    handles = [model.lm_head.register_forward_hook(note("lm_head")), model.transformer.wpe.register_forward_hook(note("wpe"))]
    assert torch.equal(logits_of(model, ids), plain)  # same values, bit for bit
    assert seen["lm_head"][0] == "SplitBackwardBackward"  # a split layer's output is re-parented (grad_fn only)
    # GPT-2's position embedding (batch 1, broadcast by the model) is expanded to the batch: a view
    assert seen["wpe"] == ("ExpandBackward0", (2 * B, T, 16))
    rec.close()
    assert torch.equal(logits_of(model, ids), plain)
    assert seen["lm_head"][0] != "SplitBackwardBackward" and seen["wpe"][1] == (1, T, 16)
    for h in handles:
        h.remove()


def test_without_a_capture_split_layers_give_the_plain_gradient():
    model = MODELS["llama"](torch.float64)
    ids, w = ids_and_weights()
    (sequence_logps(model, ids, PROMPT) * w).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    rec = gradlens.GradientRecorder(model)
    (sequence_logps(model, ids, PROMPT) * w).sum().backward()  # recorder attached, no capture open
    rec.close()
    for a, p in zip(plain, model.parameters()):
        assert (a - p.grad).norm() <= 1e-12 * a.norm()


class ReadsItsWeightTwice(nn.Module):
    """A split Linear whose weight is also read directly (like a fused kernel would)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(torch.tanh(self.proj(x) + F.linear(x, self.proj.weight)))


def test_a_split_layer_weight_also_read_directly_is_unattributed():
    model = ReadsItsWeightTwice().double()
    ids, w = ids_and_weights()
    rec = gradlens.GradientRecorder(model)
    lp = sequence_logps(model, ids, PROMPT)
    with pytest.warns(UnattributedGradientWarning, match="proj.weight"):
        with rec.capture(groups=GROUPS) as cap:
            (lp * w).sum().backward()
    assert set(cap.unattributed) == {"proj.weight"}
    assert cap.per_layer().set_index("name").loc["proj.bias", "path"] == "linear"


def test_modules_that_mix_rows_are_refused_with_their_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\) mixes the rows"):
        gradlens.GradientRecorder(model)


class Scale(nn.Module):
    """y = x * w: a layer no built-in rule knows."""

    def __init__(self, width: int):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x * self.w


@register_rule(Scale)
def _scale_rule() -> Rule:
    def contribution(use, rows):
        return {"w": (rows(use.grad()) * rows(use.input())).reshape(-1, use.module.w.numel()).sum(0).to(use.dtype)}

    def probe(use, probes):
        t = (use.grad() * use.input()).reshape(-1, use.module.w.numel()).sum(0).to(use.dtype)
        return {"w": (t @ probes["w"][0], t.abs() @ probes["w"][0].abs())}

    return Rule("test-scale", contribution, probe)


class ScaledLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.scale = Scale(6)
        self.head = nn.Linear(6, VOCAB)

    def forward(self, ids):
        return self.head(torch.tanh(self.scale(self.embed(ids))))


def test_a_registered_rule_is_used_and_exact():
    model = ScaledLM().double()
    ids, w = ids_and_weights()
    ref = reference_pieces(model, sequence_logps(model, ids, PROMPT), w, GROUPS)
    rec = gradlens.GradientRecorder(model)
    assert rec.paths()["scale"] == "test-scale"
    lp = sequence_logps(model, ids, PROMPT)
    with rec.capture(groups=GROUPS, keep_pieces=True) as cap:
        (lp * w).sum().backward()
    for g in GROUPS:
        torch.testing.assert_close(cap.pieces(g)["scale.w"], ref[g]["scale.w"], rtol=1e-10, atol=1e-12)


def test_register_rule_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_rule(nn.GELU)(lambda: Rule("test-scale", lambda use, rows: {}))
    with pytest.raises(ValueError, match="already has the recorder rule"):
        register_rule(nn.Linear)(lambda: Rule("another-linear", lambda use, rows: {}))
