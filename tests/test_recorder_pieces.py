"""``capture(..., keep_pieces=True)``: every parameter's chosen and rejected gradient piece,
against separate ``torch.autograd.grad`` passes (fp64 to 1e-10, fp32 to 1e-5 of the
parameter's gradient norm), on GPT-2 (tied wte/lm_head), Llama (RMSNorm) and a custom
model taking the exact fallback."""

from __future__ import annotations

import pytest
import torch

import gradlens
from models import MODELS, VOCAB, reference_pieces, sequence_logps

B, T, PROMPT = 3, 8, 3
GROUPS = {"chosen": slice(0, B), "rejected": slice(B, 2 * B)}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def batch_and_weights(dtype):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (2 * B, T), generator=g)
    return ids, torch.randn(2 * B, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["gpt2", "llama", "custom"])
def test_kept_pieces_match_separate_autograd_passes(family, dtype):
    model = MODELS[family](dtype).eval()
    ids, w = batch_and_weights(dtype)
    lp = sequence_logps(model, ids, PROMPT)
    ref = reference_pieces(model, lp, w, GROUPS)
    rec = gradlens.GradientRecorder(model)
    model.zero_grad(set_to_none=True)
    lp = sequence_logps(model, ids, PROMPT)
    with rec.capture(groups=GROUPS, keep_pieces=True) as cap:
        (lp * w).sum().backward()
    rec.close()
    named = dict(model.named_parameters())
    pieces = {g: cap.pieces(g) for g in GROUPS}
    assert set(pieces["chosen"]) == set(ref["chosen"])  # every parameter, tied ones once
    for name, p in named.items():
        scale = p.grad.norm().item()
        for g in GROUPS:
            got, want = pieces[g][name], ref[g][name]
            assert got.shape == p.shape and got.dtype == dtype
            assert (got - want).norm().item() <= TOL[dtype] * scale, (name, g)
        assert (pieces["chosen"][name] + pieces["rejected"][name] - p.grad).norm().item() <= TOL[dtype] * scale
        assert pieces["rejected"][name].data_ptr() != p.grad.data_ptr()  # p.grad is never aliased


def test_pieces_need_keep_pieces_and_a_known_group():
    model = MODELS["custom"]().eval()
    ids, w = batch_and_weights(torch.float32)
    rec = gradlens.GradientRecorder(model)
    lp = sequence_logps(model, ids, PROMPT)
    with rec.capture(groups=GROUPS) as cap:
        (lp * w).sum().backward()
    with pytest.raises(ValueError, match="keep_pieces=True"):
        cap.pieces("chosen")
    with pytest.raises(ValueError, match="unknown group"):
        cap.pieces("nope")
