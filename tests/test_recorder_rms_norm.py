"""The RMSNorm rule: chosen by what a module computes (not its class name), and exact per parameter.

Predicate: transformers' Llama, Qwen2, Mistral and T5 norms and torch's ``nn.RMSNorm``
take the rule; Gemma's (1 + w), a wrong ``eps`` and an RMSNorm-named module computing
something else take the exact fallback.

Exactness: every norm weight's chosen and rejected pieces (``keep_pieces``) against
separate ``torch.autograd.grad`` passes. Tolerance, per parameter, relative to the
norm of that parameter's whole gradient: float64 1e-10 (measured <= 1.6e-16 for Llama and Qwen2,
whose x̂ is formed in float32 even then and is replayed as such), float32 1e-5 (measured <= 1.2e-7).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import gradlens
from gradlens.gradients import rule_for
from models import VOCAB, reference_pieces, sequence_logps

B, T, PROMPT = 3, 8, 3
GROUPS = {"chosen": slice(0, B), "rejected": slice(B, 2 * B)}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


class ScaledRms(nn.Module):
    """An RMSNorm under another name: the rule must find it by its forward."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.variance_epsilon = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


class NotReallyRMSNorm(nn.Module):
    """Named like one, but centres x first (a bias-free LayerNorm)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = 1e-6

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class WrongEps(ScaledRms):
    """States eps = 1e-6 but computes with 1e-3."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3) * self.weight


def _transformers_norms():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm, T5LayerNorm, GemmaRMSNorm


def test_rms_norm_is_chosen_by_its_forward():
    llama, qwen2, mistral, t5, gemma = _transformers_norms()
    takes_rule = [llama(8), qwen2(8, eps=1e-6), mistral(8), t5(8), nn.RMSNorm(8), nn.RMSNorm(8, eps=1e-5),
                  ScaledRms(8), llama(8).to(torch.bfloat16), llama(8).double()]
    for m in takes_rule:
        assert rule_for(m).name == "rmsnorm", type(m).__name__
    for m in [gemma(8), NotReallyRMSNorm(8), WrongEps(8), nn.LayerNorm(8, bias=False)]:
        assert rule_for(m).name in ("fallback", "layernorm"), type(m).__name__
        assert rule_for(m).name != "rmsnorm"


def tiny(family: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(LlamaConfig(**kw)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw))
    with torch.no_grad():  # weights away from 1, so a missed w in the formula would show
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.uniform_(0.5, 1.5)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("split_backward", [True, False])
def test_rms_norm_pieces_per_parameter(family, dtype, split_backward):
    model = tiny(family, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (2 * B, T), generator=g)
    w = torch.randn(2 * B, generator=g, dtype=dtype)
    ref = reference_pieces(model, sequence_logps(model, ids, PROMPT), w, GROUPS)
    rec = gradlens.GradientRecorder(model, split_backward=split_backward)
    norms = [p for p, r in rec.paths().items() if r == "rmsnorm"]
    assert len(norms) == 5 and "fallback" not in rec.paths().values()
    lp = sequence_logps(model, ids, PROMPT)
    with rec.capture(groups=GROUPS, keep_pieces=True) as cap:
        (lp * w).sum().backward()
    rec.close()
    assert not cap.unattributed
    table = cap.per_layer().set_index("name")
    worst = 0.0
    for path in norms:
        name = f"{path}.weight"
        assert table.loc[name, "path"] == "rmsnorm"
        scale = (ref["chosen"][name] + ref["rejected"][name]).norm().item()
        for group in GROUPS:
            err = (cap.pieces(group)[name] - ref[group][name]).norm().item() / scale
            worst = max(worst, err)
    assert worst <= TOL[dtype], worst
    print(f"{family} {dtype} worst relative error {worst:.1e}")
