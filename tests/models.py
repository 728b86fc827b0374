"""Tiny models for recorder tests: built from configs, nothing downloaded."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 40


def tiny_gpt2(dtype=torch.float32, seed: int = 0) -> nn.Module:
    """GPT-2: Conv1D layers, LayerNorm, tied wte / lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype)


def tiny_llama(dtype=torch.float32, seed: int = 0) -> nn.Module:
    """Llama: Linear layers without bias, RMSNorm, untied lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype)


class GatedResidual(nn.Module):
    """A custom parameter-bearing module no rule knows: it must take the exact fallback."""

    def __init__(self, width: int):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.scale = nn.Parameter(torch.ones(width) + 0.1 * torch.randn(width))
        self.dropout = nn.Dropout(0.2)  # exercises RNG replay in the fallback

    def forward(self, x):
        return x + self.dropout(torch.tanh(x @ self.gate) * self.scale)


class CustomLM(nn.Module):
    """Embedding -> fallback block -> LayerNorm -> Linear head, behaving like a causal LM."""

    def __init__(self, width: int = 12):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width, padding_idx=1)
        self.block = GatedResidual(width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids):
        return self.head(self.norm(self.block(self.embed(input_ids))))


def custom_lm(dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CustomLM().to(dtype).train()


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids) if hasattr(model, "config") else model(ids)
    return out.logits if hasattr(out, "logits") else out


def sequence_logps(model: nn.Module, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Sum of completion-token log-probs (tokens after ``prompt_len``), one per row."""
    logits = logits_of(model, ids)[:, :-1]
    logp = F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = torch.zeros_like(logp)
    mask[:, prompt_len - 1 :] = 1
    return (logp * mask).sum(-1)


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "custom": custom_lm}


def reference_pieces(model: nn.Module, lp: torch.Tensor, w: torch.Tensor, groups: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Independent reference: group -> {parameter name -> gradient of Σ_{i in rows} w_i lp_i}.

    One separate ``torch.autograd.grad`` pass per group over the same forward ``lp``
    (rows are independent, so each pass is that group's exact gradient). Names follow
    ``model.named_parameters()`` (a tied parameter appears once, under its first name).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {}
    for group, rows in groups.items():
        grads = torch.autograd.grad((lp[rows] * w[rows]).sum(), [p for _, p in named], retain_graph=True, allow_unused=True)
        out[group] = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}
    return out
