"""Per-layer rows of a deep model grouped by transformer block and kind, so a heatmap of 30 blocks stays readable.

A 30-layer Llama has 272 parameter modules (420 with a LoRA adapter on every linear
layer): one heatmap row each is unreadable. ``group_by_block`` sums the squared
norms of every module of one block and one kind (attention, MLP, norm, ...) into
one row -- exact, because squared norms of disjoint parameters add -- so the
heatmap shows ln rho of, e.g., "block 7 · mlp". Modules outside the numbered
blocks (embedding, final norm, head) keep a row of their own.
"""

from __future__ import annotations

import re
import warnings

import numpy as np

from .layers import LayerArrays

# "...layers.7.", "...h.7." (GPT-2), "...blocks.7.", "...layer.7." (BERT-style): the block index.
BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+)$")
# The first kind whose pattern occurs in the module path within the block names it: norms first, since
# Llama's "post_attention_layernorm" is a norm. The display order is ORDER.
KINDS = (("norm", ("norm", "ln_")), ("attention", ("attn", "attention")), ("mlp", ("mlp", "ffn", "feed_forward")))
ORDER = ("attention", "mlp", "norm")
PREFIXES = re.compile(r"^(?:base_model\.model\.)?")  # peft's wrapper adds this to every name


def block_kind(name: str) -> tuple[int, str] | None:
    """(block index, kind) of a module path inside a numbered block, else None."""
    match = BLOCK.search(PREFIXES.sub("", name))
    if match is None:
        return None
    rest = match.group(2)
    kind = next((k for k, marks in KINDS if any(m in rest for m in marks)), rest.split(".")[0])
    return int(match.group(1)), kind


def group_label(name: str) -> str:
    found = block_kind(name)
    if found is None:  # the embedding, the final norm, the head: one row each, without peft's prefix
        return re.sub(r"\.lora_[AB]\.default$", "", PREFIXES.sub("", name))
    return f"block {found[0]} · {found[1]}"


def _position(label: str, names: list[str], labels: list[str]) -> tuple:
    """Top to bottom: the embedding, blocks 0, 1, ... (attention, MLP, norm), then the final norm and the head."""
    found = block_kind(names[labels.index(label)])
    if found is None:
        return (0 if "embed" in label or "wte" in label else 2, 0, label)
    return (1, found[0], ORDER.index(found[1]) if found[1] in ORDER else len(ORDER), found[1])


def group_by_block(arrays: LayerArrays) -> LayerArrays:
    """``arrays`` with one column per (block, kind): the sums of its modules' squared norms (NaN only when all are)."""
    labels = [group_label(n) for n in arrays.names]
    order = sorted(dict.fromkeys(labels), key=lambda label: _position(label, arrays.names, labels))
    columns = {label: [i for i, l in enumerate(labels) if l == label] for label in order}
    out = []
    for values in (arrays.chosen_sq, arrays.rejected_sq):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sums = [np.where(np.isnan(values[:, idx]).all(axis=1), np.nan, np.nansum(values[:, idx], axis=1)) for idx in columns.values()]
        out.append(np.stack(sums, axis=1) if sums else values[:, :0])
    return LayerArrays(arrays.steps, order, out[0], out[1])
