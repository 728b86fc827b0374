"""Load a causal language model and its tokenizer from a GGUF file or a Hugging Face directory, offline.

transformers dequantises a GGUF file to float tensors (with the ``gguf`` package)
but keeps a "quantizer" on the model that makes ``save_pretrained`` refuse it.
The weights are plain floats by then, so ``plain_model`` drops that marker: the
model trains, and its checkpoints load with ``AutoModelForCausalLM.from_pretrained``
like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def check_model_path(path: str | Path) -> Path:
    """``path`` if it is a GGUF file or a Hugging Face model directory; otherwise a message saying what it is not."""
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"{path}: model directory not found; --model takes a local directory written by save_pretrained, or a .gguf file "
            "(gradlens never downloads models; `gradlens fetch smollm2` fetches the one built-in model)"
        )
    if is_gguf(path):
        if not path.is_file():
            raise ValueError(f"{path}: a .gguf model must be a file")
        return path
    if not path.is_dir():
        raise ValueError(f"{path}: --model must be a directory written by save_pretrained or a .gguf file")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path


def plain_model(model: nn.Module) -> nn.Module:
    """``model`` without the GGUF quantizer marker that makes ``save_pretrained`` refuse it (its weights are already floats)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model


def _require_gguf(path: Path) -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise ValueError(f"{path}: reading a GGUF file needs the gguf package: pip install 'gradlens[gguf]'") from None


def load_causal_lm(path: str | Path, dtype: str = "float32") -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a ``.gguf`` file or a Hugging Face directory; the model is plain (see ``plain_model``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_path(path)
    if is_gguf(path):
        _require_gguf(path)
        where = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
    else:
        where = dict(pretrained_model_name_or_path=path, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... for unusable inputs
        raise ValueError(f"{path}: could not load a tokenizer: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=TORCH_DTYPES[dtype])
    except Exception as exc:
        raise ValueError(f"{path}: could not load a causal language model: {exc}") from exc
    return plain_model(model), tokenizer
