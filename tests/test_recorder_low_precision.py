"""The split backward under bf16 autocast and with bf16 weights: the casts autocast made are replayed.

Split layers (``nn.Linear``, ``Conv1D``) compute each group's Gᵀ A with the operands autograd's
own backward uses (bf16, A cast as the forward cast it) and the same accumulation (bf16
products accumulate in float32 inside the kernel, rounded once), so, per parameter:

- the pieces add up to the plain backward's ``p.grad`` (no recorder, same model, same
  autocast): relative to that gradient's norm, measured <= 3.4e-3 under autocast and
  <= 5.7e-3 with bf16 weights (whose own ``p.grad`` is rounded to bf16, unit 2⁻⁸ = 3.9e-3,
  after every use of a tied or reused parameter); bound 8e-3;
- each piece equals torch's own bf16 group gradient (separate ``autograd.grad`` passes
  over the group's rows, same autocast): relative to the parameter's whole gradient,
  measured <= 2.4e-3 under autocast, 9.2e-3 to 1.6e-2 with bf16 weights (depending on
  the thread count: the reduction order changes the bf16 roundings, and the reference's own tied
  gradient is rounded after each of its two uses, as the piece's is); bound 3e-2, about 8
  bf16 units, while a mis-assigned row or a missed use errs by order 1;
- the recorded ``p.grad`` equals the plain one to the same bound.

Each is checked per parameter, on GPT-2 (Conv1D, LayerNorm, tied embedding) and Llama
(Linear, RMSNorm), with ``backward()`` inside the autocast block.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gradlens
from models import MODELS, VOCAB, reference_pieces, sequence_logps

B, T, PROMPT = 3, 8, 3
GROUPS = {"chosen": slice(0, B), "rejected": slice(B, 2 * B)}
SUM_TOL = 8e-3
PIECE_TOL = 3e-2


def _context(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else torch.autocast("cpu", enabled=False)


def _model(family: str, mode: str):
    model = MODELS[family](torch.float32)
    return model.to(torch.bfloat16) if mode == "weights" else model


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, VOCAB, (2 * B, T), generator=g), torch.randn(2 * B, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / scale.double().norm().clamp_min(1e-30)).item()


def _split_outputs(model) -> list[str]:
    """Names of the grad_fns of linear-type outputs, as the recorder left them."""
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            m.register_forward_hook(lambda mod, args, out: seen.append(type(out.grad_fn).__name__))
    return seen


@pytest.mark.parametrize("mode", ["autocast", "weights"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_low_precision_split_per_parameter(family, mode):
    ids, w = _batch()
    model = _model(family, mode)
    plain_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    w = w.to(next(model.parameters()).dtype)
    with _context(mode):
        (sequence_logps(plain_model, ids, PROMPT) * w).sum().backward()
        ref = reference_pieces(ref_model, sequence_logps(ref_model, ids, PROMPT), w, GROUPS)
        rec = gradlens.GradientRecorder(model)
        kinds = _split_outputs(model)
        lp = sequence_logps(model, ids, PROMPT)
        with rec.capture(groups=GROUPS, keep_pieces=True) as cap:
            (lp * w).sum().backward()
    rec.close()
    assert kinds and set(kinds) == {"SplitBackwardBackward"}, set(kinds)  # every linear layer was split
    assert cap.unattributed == {}
    plain = dict(plain_model.named_parameters())
    chosen, rejected = cap.pieces("chosen"), cap.pieces("rejected")
    worst = {"sum": 0.0, "piece": 0.0, "grad": 0.0}
    for name, p in model.named_parameters():
        if name not in chosen:
            continue  # a tied parameter's second name
        g = plain[name].grad
        worst["sum"] = max(worst["sum"], _rel(chosen[name] + rejected[name], g, g))
        worst["grad"] = max(worst["grad"], _rel(p.grad, g, g))
        for group, piece in (("chosen", chosen[name]), ("rejected", rejected[name])):
            worst["piece"] = max(worst["piece"], _rel(piece, ref[group][name], g))
    print(family, mode, {k: f"{v:.1e}" for k, v in worst.items()})
    assert worst["sum"] <= SUM_TOL and worst["grad"] <= SUM_TOL and worst["piece"] <= PIECE_TOL, worst
