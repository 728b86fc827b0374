"""Grouping a deep model's per-layer rows by block and kind, and the grouped heatmap."""

from __future__ import annotations

import numpy as np
import pandas as pd

from gradlens.analysis.layer_kinds import block_kind, group_by_block, group_label
from gradlens.analysis.layers import layer_arrays


def test_block_and_kind_of_common_module_paths():
    assert block_kind("model.layers.7.self_attn.q_proj") == (7, "attention")
    assert block_kind("base_model.model.model.layers.29.mlp.down_proj.lora_B.default") == (29, "mlp")
    assert block_kind("model.layers.0.post_attention_layernorm") == (0, "norm")  # a norm, though its name says attention
    assert block_kind("transformer.h.3.attn.c_attn") == (3, "attention")
    assert block_kind("transformer.h.3.ln_1") == (3, "norm")
    assert block_kind("model.embed_tokens,lm_head") is None and group_label("model.embed_tokens,lm_head") == "model.embed_tokens,lm_head"


def test_grouping_sums_squared_norms_exactly_and_keeps_nan_only_when_all_missing():
    names = ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj",
             "model.layers.0.post_attention_layernorm", "model.embed_tokens"]  # fmt: skip
    rows = [(0, n, 1.0 + i, 2.0 + i) for i, n in enumerate(names)] + [(1, names[0], 3.0, 5.0), (1, names[1], np.nan, np.nan)]
    table = pd.DataFrame(rows, columns=["step", "layer", "chosen_sq", "rejected_sq"])
    grouped = group_by_block(layer_arrays(table))
    assert grouped.names == ["model.embed_tokens", "block 0 · attention", "block 0 · norm", "block 1 · mlp"]
    mlp = grouped.names.index("block 1 · mlp")
    assert grouped.chosen_sq[0, mlp] == 1.0 + 2.0 and grouped.rejected_sq[0, mlp] == 2.0 + 3.0
    assert grouped.chosen_sq[1, mlp] == 3.0  # a missing module does not hide the other's value
    assert np.isnan(grouped.chosen_sq[1, grouped.names.index("block 0 · attention")])  # nothing recorded there at step 1
