"""Every layer's ``chosen_sq``, ``rejected_sq`` and ``dot`` (``Capture.layer_table``, the run logs'
``layers.csv``) against separate ``torch.autograd.grad`` passes, layer by layer.

Families: GPT-2 (Conv1D, LayerNorm, tied wte/lm_head: one parameter, two uses),
Llama (Linear, RMSNorm), and a custom model taking the exact fallback with dropout.
Every recorder path is covered: the default (split backward, norms streamed per
parameter), ``split_backward=False`` (observed backward), ``accumulate=True``
(pieces kept to the end) and ``verify=True`` (every group computed explicitly).

Tolerance, per layer: fp64 1e-10, fp32 1e-5, relative to (‖chosen‖ + ‖rejected‖)² of
that layer (the last group is the total minus the others, so its rounding scales
with the layer's whole gradient).
"""

from __future__ import annotations

import pytest
import torch

import gradlens
from models import MODELS, VOCAB, reference_pieces, sequence_logps

B, T, PROMPT = 3, 8, 3
GROUPS = {"chosen": slice(0, B), "rejected": slice(B, 2 * B)}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
MODES = {
    "default": ({}, {}),
    "observed": ({"split_backward": False}, {}),
    "accumulate": ({}, {"accumulate": True}),
    "verify": ({}, {"verify": True}),
}


def reference_layers(model, ids, w) -> dict[str, dict[str, float]]:
    torch.manual_seed(7)  # the custom model's dropout: same masks as the recorded pass
    ref = reference_pieces(model, sequence_logps(model, ids, PROMPT), w, GROUPS)
    table: dict[str, dict[str, float]] = {}
    for name, c in ref["chosen"].items():
        r = ref["rejected"][name]
        entry = table.setdefault(name.rsplit(".", 1)[0], {"chosen_sq": 0.0, "rejected_sq": 0.0, "dot": 0.0})
        entry["chosen_sq"] += (c * c).sum().item()
        entry["rejected_sq"] += (r * r).sum().item()
        entry["dot"] += (c * r).sum().item()
    return table


def recorded_layers(model, ids, w, recorder_kwargs, capture_kwargs, groups=GROUPS, pair=("chosen", "rejected")):
    rec = gradlens.GradientRecorder(model, **recorder_kwargs)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    lp = sequence_logps(model, ids, PROMPT)
    with rec.capture(groups=groups, **capture_kwargs) as cap:
        (lp * w).sum().backward()
    rec.close()
    assert not cap.unattributed
    return cap.layer_table(*pair)


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (2 * B, T), generator=g)
    ids[B:, :PROMPT] = ids[:B, :PROMPT]  # shared prompts: chosen and rejected gradients correlate
    return ids, torch.randn(2 * B, generator=g, dtype=torch.float64).to(dtype)


def assert_layers_match(got, want, tol):
    assert set(got) == set(want)
    dots = 0.0
    for layer, ref in want.items():
        scale = (ref["chosen_sq"] ** 0.5 + ref["rejected_sq"] ** 0.5) ** 2 + 1e-300
        for key in ("chosen_sq", "rejected_sq", "dot"):
            assert abs(got[layer][key] - ref[key]) <= tol * scale, (layer, key, got[layer][key], ref[key])
        dots += abs(ref["dot"]) / scale
    assert dots > 0.01 * len(want)  # the dots are far from 0: a recorder reporting dot = 0 fails


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", ["gpt2", "llama", "custom"])
def test_every_layer_matches_separate_passes_fp64(family, mode):
    model = MODELS[family](torch.float64)
    ids, w = inputs(torch.float64)
    recorder_kwargs, capture_kwargs = MODES[mode]
    assert_layers_match(recorded_layers(model, ids, w, recorder_kwargs, capture_kwargs), reference_layers(model, ids, w), TOL[torch.float64])


@pytest.mark.parametrize("family", ["gpt2", "llama", "custom"])
def test_every_layer_matches_separate_passes_fp32(family):
    model = MODELS[family](torch.float32)
    ids, w = inputs(torch.float32)
    assert_layers_match(recorded_layers(model, ids, w, {}, {}), reference_layers(model, ids, w), TOL[torch.float32])


def test_layer_table_keys_follow_the_group_names():
    model = MODELS["gpt2"](torch.float64)
    ids, w = inputs(torch.float64)
    groups = {"good": slice(0, B), "bad": slice(B, 2 * B)}
    table = recorded_layers(model, ids, w, {}, {}, groups=groups, pair=("good", "bad"))
    want = reference_layers(model, ids, w)
    for layer, entry in table.items():
        assert set(entry) == {"good_sq", "bad_sq", "dot"}
        assert abs(entry["bad_sq"] - want[layer]["rejected_sq"]) <= 1e-10 * (want[layer]["chosen_sq"] + want[layer]["rejected_sq"])


def test_layer_norm_bias_whose_row_gradients_cancel_is_attributed():
    """A reward model's Bradley-Terry loss sends opposite gradients through a pair's two rows; with a
    bias-free score head after GPT-2's final LayerNorm, that LayerNorm's bias gets a total gradient of
    (nearly exactly) 0 while each side's piece is not. The probe check must compare against the
    magnitudes summed, not against the cancelled sum (which would flag the bias as unattributed)."""
    import gradlens
    from trl_tiny import build_model

    model = build_model("gpt2", num_labels=1).train()
    ids = torch.tensor([[4, 5, 6, 7, 13, 14, 15, 0], [8, 9, 0, 0, 0, 0, 0, 0], [17, 2, 2, 0, 0, 0, 0, 0], [2, 3, 4, 5, 6, 0, 0, 0],
                        [4, 5, 6, 7, 16, 0, 0, 0], [8, 10, 11, 0, 0, 0, 0, 0], [17, 3, 0, 0, 0, 0, 0, 0], [2, 3, 4, 7, 8, 9, 0, 0]])  # fmt: skip
    with gradlens.GradientRecorder(model) as rec:
        with rec.capture(groups={"chosen": slice(0, 4), "rejected": slice(4, 8)}) as cap:
            scores = model(input_ids=ids, attention_mask=(ids != 0).long()).logits.squeeze(-1)
            (-torch.nn.functional.logsigmoid(scores[:4] - scores[4:])).mean().backward()
    bias = model.transformer.ln_f.bias
    assert bias.grad.abs().max() <= 1e-6  # the total cancels
    assert not cap.unattributed
    table = cap.per_layer().set_index("name")
    assert table.loc["transformer.ln_f.bias", "sq_norm/chosen"] > 1e-8
