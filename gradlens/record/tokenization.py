"""Preference pairs to token ids, the TRL way, and the [chosen; rejected] batch layout.

* Prompt and completion are tokenised **separately** and their ids concatenated
  (docs/recording.md, Conventions). The prompt gets the tokenizer's special tokens (e.g. BOS) as
  ``tokenizer(prompt)`` adds them; the completion gets none, and EOS is appended
  to standard-format completions as TRL does.
* Conversational data is rendered with the tokenizer's chat template: the
  prompt with ``add_generation_prompt=True``; the completion is what the
  rendering of prompt + completion adds after the rendered prompt.
* ``--max-length`` truncation follows TRL's ``keep_start``: prompt + completion
  keeps its first ``max_length`` tokens, so the end of a long completion is cut.
  A pair whose prompt alone has ``max_length`` tokens or more would keep no
  completion token; it is refused with an error naming its line (TRL drops it
  silently).
* Batches put chosen rows first, then rejected rows, right-padded, with an
  attention mask and a completion mask (TRL's ``DataCollatorForPreference``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..pairs import join_pairs

from .data import PreferenceData, PreferenceRecord


@dataclass(frozen=True)
class TokenPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    where: str = ""


@dataclass
class TokenBatch:
    """2b rows: ``[0, b)`` prompt+chosen, ``[b, 2b)`` prompt+rejected."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]


@dataclass(frozen=True)
class TokenizedData:
    pairs: list[TokenPair]
    truncated: int            # pairs with at least one side cut by max_length
    identical_after_truncation: int


def _apply_template(tokenizer: Any, messages: list, record: PreferenceRecord, source: str, **options) -> str:
    """The chat template's text; a template that refuses the messages (its ``raise_exception``,
    e.g. for a role it does not know) or fails is a problem with that pair, named by its line."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as exc:  # noqa: BLE001 - jinja2's TemplateError and whatever else the template raises
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{source}: {record.where}: the model's chat template refused these messages: {reason}") from None


def _render_conversation(tokenizer: Any, record: PreferenceRecord, completion: list, source: str) -> tuple[str, str]:
    prompt_text = _apply_template(tokenizer, record.prompt, record, source, add_generation_prompt=True)
    full_text = _apply_template(tokenizer, record.prompt + completion, record, source)
    if not full_text.startswith(prompt_text):
        # Some templates render the generation prompt differently from a finished turn:
        # the completion starts where the two renderings diverge (as in TRL).
        common = 0
        for a, b in zip(prompt_text, full_text):
            if a != b:
                break
            common += 1
        prompt_text = prompt_text[:common]
    completion_text = full_text[len(prompt_text):]
    if not completion_text.strip():
        raise ValueError(f"{source}: {record.where}: the chat template renders the completion as empty text")
    return prompt_text, completion_text


def tokenize_record(tokenizer: Any, record: PreferenceRecord, *, conversational: bool, source: str) -> TokenPair:
    """One record -> prompt / chosen / rejected ids (not yet truncated)."""
    if conversational:
        prompt_text, chosen_text = _render_conversation(tokenizer, record, record.chosen, source)
        _, rejected_text = _render_conversation(tokenizer, record, record.rejected, source)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        chosen_ids = tokenizer(chosen_text, add_special_tokens=False)["input_ids"]
        rejected_ids = tokenizer(rejected_text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(record.prompt)["input_ids"]
        eos = tokenizer.eos_token_id
        chosen_ids = list(tokenizer(record.chosen, add_special_tokens=False)["input_ids"])
        rejected_ids = list(tokenizer(record.rejected, add_special_tokens=False)["input_ids"])
        if eos is not None:
            chosen_ids = chosen_ids if chosen_ids[-1:] == [eos] else chosen_ids + [eos]
            rejected_ids = rejected_ids if rejected_ids[-1:] == [eos] else rejected_ids + [eos]
    if not prompt_ids:
        raise ValueError(
            f"{source}: {record.where}: the prompt tokenises to no tokens and the tokenizer adds no BOS token, "
            "so the first completion token has nothing to be predicted from"
        )
    for name, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        if not ids:
            raise ValueError(f"{source}: {record.where}: '{name}' tokenises to no tokens")
    return TokenPair(tuple(prompt_ids), tuple(chosen_ids), tuple(rejected_ids), record.where)


def truncate_pair(pair: TokenPair, max_length: int, source: str) -> tuple[TokenPair, bool]:
    """TRL keep_start: prompt + completion keeps its first max_length tokens."""
    room = max_length - len(pair.prompt_ids)
    if room <= 0:
        raise ValueError(
            f"{source}: {pair.where}: the prompt alone has {len(pair.prompt_ids)} tokens, at least --max-length "
            f"{max_length}, so no completion token would remain; raise --max-length or shorten the prompt"
        )
    cut = len(pair.chosen_ids) > room or len(pair.rejected_ids) > room
    if not cut:
        return pair, False
    return TokenPair(pair.prompt_ids, pair.chosen_ids[:room], pair.rejected_ids[:room], pair.where), True


def tokenize_preferences(tokenizer: Any, data: PreferenceData, max_length: int) -> TokenizedData:
    """Tokenise every record of a file, truncating per TRL (see the module docstring)."""
    if data.conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{data.path}: the data is conversational but the tokenizer has no chat template")
    pairs, truncated, identical = [], 0, 0
    for record in data.records:
        pair = tokenize_record(tokenizer, record, conversational=data.conversational, source=str(data.path))
        pair, was_cut = truncate_pair(pair, max_length, str(data.path))
        truncated += was_cut
        if pair.chosen_ids == pair.rejected_ids:
            identical += 1  # chosen and rejected differ only beyond max_length
            continue
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{data.path}: no usable pairs remain after truncation to --max-length {max_length}")
    return TokenizedData(pairs, truncated, identical)


def collate_sequences(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_token_id: int,
    device: torch.device | str = "cpu",
    *,
    allow_empty: bool = False,
) -> TokenBatch:
    """Rows prompt + completion, right-padded, with attention and completion masks."""
    if not allow_empty and any(len(c) == 0 for c in completions):
        raise ValueError("a completion has no tokens")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    completion_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        n = len(prompt) + len(completion)
        input_ids[row, :n] = torch.tensor(list(prompt) + list(completion), dtype=torch.long)
        attention_mask[row, :n] = 1
        completion_mask[row, len(prompt) : n] = 1
    return TokenBatch(input_ids.to(device), attention_mask.to(device), completion_mask.to(device))


def collate_pairs(pairs: Sequence[TokenPair], pad_token_id: int, device: torch.device | str = "cpu") -> TokenBatch:
    """[prompt+chosen rows; prompt+rejected rows], right-padded (TRL's layout)."""
    prompts = join_pairs([p.prompt_ids for p in pairs], [p.prompt_ids for p in pairs])
    completions = join_pairs([p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs])
    return collate_sequences(prompts, completions, pad_token_id, device)
