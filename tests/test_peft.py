"""LoRA (peft 0.21) models: the recorder splits the adapter's gradients exactly and ignores the frozen base.

Reference: the separate ``autograd.grad`` passes of ``test_recorder_exact`` over the
trainable parameters only (LoRA A and B, and ``modules_to_save`` copies). B starts
random (``init_lora_weights=False``): with peft's default B = 0, A's gradient is 0 and
its split could not fail.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from models import tiny_gpt2, tiny_llama  # noqa: E402
from test_recorder_exact import make_batch, recorded, reference_split, rel  # noqa: E402

TOL = 1e-10  # float64
# Per family: the LoRA target modules and a module trained in full next to the adapter.
LORA = {
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["ln_f"], fan_in_fan_out=True),  # Conv1D targets, a LayerNorm saved
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["lm_head"]),  # Linear targets
}
BUILD = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def lora_model(family: str, *, dropout: float = 0.0, dtype=torch.float64):
    base = BUILD[family](torch.float32)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False, **LORA[family])
    return peft.get_peft_model(base, config).to(dtype)


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_split_matches_separate_autograd_passes(family, dropout):
    model = lora_model(family, dropout=dropout).train()  # dropout on: the recorder must see the masks the forward drew
    names = trainable_names(model)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert any("modules_to_save" in n for n in names) and len(names) < len(list(model.parameters()))
    ids = make_batch()
    torch.manual_seed(5)
    gc, gr = reference_split(model, ids, "balanced")
    torch.manual_seed(5)  # the same dropout masks in the recorded pass
    cap = recorded(model, ids, "balanced")
    assert cap.unattributed == {}
    assert rel(cap.norm("chosen"), gc.norm().item()) <= TOL
    assert rel(cap.norm("rejected"), gr.norm().item()) <= TOL
    assert abs(cap.dot("chosen", "rejected") - (gc @ gr).item()) <= TOL * gc.norm().item() * gr.norm().item()
    table = cap.per_layer()
    assert set(table.name) == names  # the adapter and the saved module, never the frozen base


def test_lora_dropout_masks_matter():
    """The dropout test can fail: other masks give another split."""
    model = lora_model("llama", dropout=0.3).train()
    ids = make_batch()
    torch.manual_seed(5)
    gc, _ = reference_split(model, ids, "balanced")
    torch.manual_seed(6)
    cap = recorded(model, ids, "balanced")
    assert rel(cap.norm("chosen"), gc.norm().item()) > 1e-3


def test_lora_per_parameter_pieces_match():
    """Each LoRA matrix on its own, not only the sums."""
    model = lora_model("gpt2")
    ids = make_batch()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gc, gr = reference_split(model, ids, "dpo")
    cap = recorded(model, ids, "dpo")
    table = cap.per_layer().set_index("name")
    offset = 0
    for name, p in params:
        c, r = gc[offset : offset + p.numel()], gr[offset : offset + p.numel()]
        offset += p.numel()
        assert abs(table.loc[name, "sq_norm/chosen"] - c.pow(2).sum().item()) <= TOL * max(c.pow(2).sum().item(), 1e-12), name
        assert abs(table.loc[name, "dot/chosen/rejected"] - (c @ r).item()) <= TOL * (c.norm() * r.norm()).item() + 1e-300, name
