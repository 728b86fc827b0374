"""Embeddings: the norms of an embedding's pieces are taken over the rows the batch touched.

An untied embedding's group pieces are kept as sparse rows (token ids and output gradients),
never as a vocabulary-sized buffer, and its norms come from those rows plus one pass over
the real gradient. Checked per layer against separate ``torch.autograd.grad`` passes, with
repeated tokens, a padding index and ``scale_grad_by_freq``, in the default capture,
``accumulate=True`` and ``verify=True`` (float64, 1e-10 of the layer's (‖g_c‖ + ‖g_r‖)²;
measured <= 8.2e-17). A gradient reaching the embedding's weight outside its module (the
weight read directly as an output layer) makes it unattributed, never a partial norm.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import gradlens
from gradlens.gradients import UnattributedGradientWarning
from models import reference_pieces

VOCAB, B, T = 50, 3, 7
GROUPS = {"chosen": slice(0, B), "rejected": slice(B, 2 * B)}


class EmbedLM(nn.Module):
    def __init__(self, scale_grad_by_freq: bool = False, read_weight: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, padding_idx=1, scale_grad_by_freq=scale_grad_by_freq)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, VOCAB)
        self.read_weight = read_weight

    def forward(self, ids):
        h = torch.tanh(self.body(self.embed(ids)))
        logits = self.head(h)
        if self.read_weight:  # the embedding's weight used outside its module: no hook sees it
            logits = logits + h @ self.embed.weight.T
        return logits


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (2 * B, T), generator=g)  # few distinct tokens: many repeats
    ids[:, -1] = 1  # padding
    return ids, torch.randn(2 * B, T, VOCAB, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("options", [{}, {"accumulate": True}, {"verify": True}])
@pytest.mark.parametrize("scale", [False, True])
def test_embedding_norms_over_touched_rows(options, scale):
    torch.manual_seed(0)
    model = EmbedLM(scale_grad_by_freq=scale).double()
    ids, w = _batch()
    out = model(ids)
    rows = (out * w).sum((1, 2))
    ref = reference_pieces(model, rows, torch.ones(2 * B, dtype=torch.float64), GROUPS)
    rec = gradlens.GradientRecorder(model)
    with rec.capture(groups=GROUPS, **options) as cap:
        (model(ids) * w).sum().backward()
        if options.get("accumulate"):  # pieces kept to the end: still sparse, no vocabulary-sized buffer
            (state,) = [st for st in cap._params.values() if st.name == "embed.weight"]
            assert state.groups == {} and state.sparse
    rec.close()
    c, r = ref["chosen"]["embed.weight"], ref["rejected"]["embed.weight"]
    got = cap.layer_table()["embed"]
    scale_sq = (c.norm() + r.norm()).item() ** 2
    for key, want in [("chosen_sq", c.pow(2).sum()), ("rejected_sq", r.pow(2).sum()), ("dot", (c * r).sum())]:
        assert abs(got[key] - want.item()) <= 1e-10 * scale_sq, (key, got[key], want.item())
    assert cap.per_layer().set_index("name").loc["embed.weight", "path"] == "embedding"


def test_gradient_outside_the_embedding_module_is_unattributed():
    model = EmbedLM(read_weight=True).double()
    ids, w = _batch()
    rec = gradlens.GradientRecorder(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with rec.capture(groups=GROUPS) as cap:
            (model(ids) * w).sum().backward()
    rec.close()
    assert "embed.weight" in cap.unattributed
    assert any(issubclass(x.category, UnattributedGradientWarning) for x in caught)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_head_keeps_no_parameter_sized_buffer_until_the_embedding(dtype):
    """GPT-2's lm_head shares wte's weight: after the head's use, only the rows the embedding
    will touch are kept (checked when the embedding's output gradient arrives), and every
    layer still equals separate autograd passes (float32 1e-5, float64 1e-10 of the layer's
    (‖g_c‖ + ‖g_r‖)²; measured <= 2.4e-8 and <= 5.7e-17)."""
    from models import sequence_logps, tiny_gpt2

    model = tiny_gpt2(dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 40, (2 * B, T), generator=g)
    w = torch.randn(2 * B, generator=g, dtype=dtype)
    ref = reference_pieces(model, sequence_logps(model, ids, 3), w, GROUPS)
    rec = gradlens.GradientRecorder(model)
    seen = []

    def inspect(grad):  # runs after lm_head's use, before wte's
        (state,) = [st for st in cap._params.values() if st.name == "transformer.wte.weight"]
        seen.append((dict(state.groups), state.folded_rows.numel() if state.folded_rows is not None else None))

    def watch(module, args, out):
        out.register_hook(inspect)

    handle = model.transformer.wte.register_forward_hook(watch)
    lp = sequence_logps(model, ids, 3)
    with rec.capture(groups=GROUPS) as cap:
        (lp * w).sum().backward()
    handle.remove()
    rec.close()
    (groups, kept_rows), = seen
    assert groups == {} and kept_rows == ids.unique().numel() < 40
    c, r = ref["chosen"]["transformer.wte.weight"], ref["rejected"]["transformer.wte.weight"]
    got = cap.layer_table()["transformer.wte"]
    scale_sq = (c.norm() + r.norm()).item() ** 2
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for key, want in [("chosen_sq", c.pow(2).sum()), ("rejected_sq", r.pow(2).sum()), ("dot", (c * r).sum())]:
        assert abs(got[key] - want.item()) <= tol * scale_sq, (key, got[key], want.item())
    assert cap.unattributed == {}
