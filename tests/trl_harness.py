"""What the TRL tests share: a tiny GPT-2 and its tokenizer saved to disk, the pairs they
train on, a ``DPOConfig``, a spy on the training batches, and the independent reference
split of TRL's own loss.

The reference is independent of gradlens: a plain ``trl.DPOTrainer`` with TRL's fused
LM head computes its own loss on the batches a gradlens run trained on, and separate
``autograd.grad`` passes pull its per-token weights back through the chosen rows and the
rejected rows. trl and datasets are imported where they are used, so that a test module
importing this one decides for itself whether to skip without them.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<eos>", "<unk>"] + "a b c d e f g h i j k l m n o p".split()
PAIRS = [
    {"prompt": "a b c", "chosen": " d e", "rejected": " f g h"},
    {"prompt": "b c", "chosen": " i", "rejected": " j k"},
    {"prompt": "c d e f", "chosen": " l m n", "rejected": " o"},
    {"prompt": "p", "chosen": " a a", "rejected": " b"},
    {"prompt": "e", "chosen": " f g h i", "rejected": " g"},
]
TOL = 1e-5  # relative, float32: the recorded split against the reference


def save_tiny_gpt2(path: Path) -> str:
    """A 2-layer GPT-2 with tied embeddings and a word-level tokenizer over WORDS, saved at path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>").save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)  # tie_word_embeddings: lm_head.weight is transformer.wte.weight
    return str(path)


def dpo_config(tmp_path: Path, **overrides):
    """A small CPU ``trl.DPOConfig``: 3 steps of 4 pairs, logging every step, nothing saved or reported."""
    import trl

    kwargs = dict(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        report_to="none", use_cpu=True, bf16=False, max_length=16, logging_steps=1, save_strategy="no", seed=0,
    )  # fmt: skip
    kwargs.update(overrides)
    return trl.DPOConfig(**kwargs)


def spy_training_batches(trainer) -> list[dict]:
    """The inputs of every training micro-batch, as the trainer saw them."""
    seen, compute_loss = [], trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        if model.training and torch.is_grad_enabled():
            seen.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)} | {"_checkpointing": trainer.model.is_activation_checkpointing})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    return seen


def trl_loss_split(plain, policy: torch.nn.Module, params: list[torch.Tensor], micro_batches: list[dict]) -> list[list[torch.Tensor]]:
    """[chosen, rejected]: per parameter, the gradient of ``plain``'s own loss through each row group.

    ``plain`` is a ``trl.DPOTrainer`` and ``policy`` the model it trains; the loss of each micro-batch is divided by their count
    and the pieces summed, as Trainer does under gradient accumulation. The policy's forward
    is tapped for the log-probabilities TRL's fused head returns: the loss's gradient with
    respect to them is pulled back through the first half of the rows (chosen) and the second
    half (rejected) in separate ``autograd.grad`` passes.
    """
    fused, tapped, own = policy.forward, {}, policy.__dict__.get("forward")

    def tap(*args, **kwargs):
        out = fused(*args, **kwargs)
        if torch.is_grad_enabled():
            tapped["log_probs"] = out.log_probs
        return out

    policy.forward = tap
    policy.train()
    sums = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    try:
        for inputs in micro_batches:
            inputs = {k: v for k, v in inputs.items() if not k.startswith("_")}
            loss = plain.compute_loss(policy, inputs) / len(micro_batches)
            lp = tapped.pop("log_probs")
            (w,) = torch.autograd.grad(loss, lp, retain_graph=True)
            b = lp.shape[0] // 2  # rows: [chosen; rejected]
            for k, rows in enumerate((slice(0, b), slice(b, 2 * b))):
                grads = torch.autograd.grad(lp[rows], params, grad_outputs=w[rows], retain_graph=True, allow_unused=True)
                for acc, g in zip(sums[k], grads):
                    if g is not None:
                        acc += g
    finally:  # the policy's own forward again
        if own is None:
            del policy.forward
        else:
            policy.forward = own
    return sums


def flat(parts: list[torch.Tensor]) -> torch.Tensor:
    """The per-parameter pieces of one group as one vector."""
    return torch.cat([g.reshape(-1) for g in parts])
