"""Tiny models of two families, and the word-level tokenizer of ``trl_harness``, saved to disk for the
GRPO/RLOO, KTO and reward-model trainer tests; nothing downloaded.

GPT-2 (Conv1D layers, tied embedding and LM head) and Llama (Linear layers, untied head), as causal
LMs or as sequence classifiers (reward models). Dropout is off, so a reference pass computes the same
function as the training step it checks (TRL's GRPO and reward trainers keep the model's dropout).
"""

from __future__ import annotations

import torch

from trl_harness import WORDS


def save_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>").save_pretrained(path)


def build_model(family: str, *, num_labels: int | None = None) -> torch.nn.Module:
    """A tiny causal LM (or, with ``num_labels``, a sequence classifier) of ``family``."""
    from transformers import GPT2Config, LlamaConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        config = GPT2Config(vocab_size=len(WORDS), n_positions=48, n_embd=16, n_layer=2, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, **ids)  # fmt: skip
    elif family == "llama":
        config = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=48,
                             tie_word_embeddings=False, **ids)  # fmt: skip
    else:
        raise ValueError(family)
    if num_labels is None:
        return AutoModelForCausalLM.from_config(config)
    config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(config)


def save_model(family: str, path, *, num_labels: int | None = None) -> str:
    build_model(family, num_labels=num_labels).save_pretrained(path)
    save_tokenizer(path)
    return str(path)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters, each once (a tied weight under its first name)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)
