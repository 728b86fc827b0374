"""``torch.compile``: a compiled model is recorded exactly, or not at all.

The recorder attaches to ``torch.compile(model)``'s own module (``_orig_mod``) and its
hooks are excluded from compilation, so a forward through the compiled module is split
like an eager one, whether the model was compiled before or after the recorder attached. Reference: the same step through the uncompiled model, recorded and
by separate ``torch.autograd.grad`` passes. Tolerance: float32, 1e-5 of each parameter's
gradient norm (measured <= 7.6e-8: compiled and eager kernels round differently).
The ``aot_eager`` backend compiles forward and backward graphs as inductor does, without
generating C++ code (fast enough for a test on two cores).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradlens
from models import VOCAB, reference_pieces, sequence_logps

B, T, PROMPT = 3, 8, 3
GROUPS = {"chosen": slice(0, B), "rejected": slice(B, 2 * B)}


class SmallLM(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.up = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(2 * width)
        self.head = nn.Linear(2 * width, VOCAB)

    def forward(self, input_ids):
        return self.head(self.norm(torch.relu(self.up(self.embed(input_ids)))))


@pytest.mark.parametrize("order", ["compile-then-attach", "attach-then-compile"])
def test_compiled_model_is_recorded_exactly_per_parameter(order):
    torch.manual_seed(0)
    model = SmallLM()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (2 * B, T), generator=g)
    w = torch.randn(2 * B, generator=g)
    ref = reference_pieces(model, sequence_logps(model, ids, PROMPT), w, GROUPS)

    if order == "compile-then-attach":
        compiled = torch.compile(model, backend="aot_eager")
        rec = gradlens.GradientRecorder(compiled)
    else:
        rec = gradlens.GradientRecorder(model)
        compiled = torch.compile(model, backend="aot_eager")
    assert rec.model is model  # names without "_orig_mod."
    for _ in range(2):  # the second step runs the cached compiled graphs
        model.zero_grad(set_to_none=True)
        lp = sequence_logps(compiled, ids, PROMPT)
        with rec.capture(groups=GROUPS, keep_pieces=True) as cap:
            (lp * w).sum().backward()
        assert cap.unattributed == {}
        for name, p in model.named_parameters():
            scale = (ref["chosen"][name] + ref["rejected"][name]).norm().item()
            for group in GROUPS:
                err = (cap.pieces(group)[name] - ref[group][name]).norm().item()
                assert err <= 1e-5 * scale, (name, group, err / scale)
            torch.testing.assert_close(p.grad, ref["chosen"][name] + ref["rejected"][name], rtol=1e-5, atol=1e-6)
    rec.close()
