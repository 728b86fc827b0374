"""Checkpoints: safetensors weights + optimizer state, written atomically.

``checkpoints/step_N/`` holds the state after N optimizer steps (rows 0..N-1
are logged): ``model.safetensors``, ``optimizer.pt`` (tensors and plain Python
values only, loaded with ``torch.load(weights_only=True)``) and ``state.json``.
A checkpoint is written into a temporary directory and renamed, so a run killed
mid-write leaves the previous checkpoint intact. ``checkpoints/reference/``
holds the starting policy of environments whose warm-start is not
bit-reproducible, so a resumed run uses exactly the same reference.

A Hugging Face model's checkpoint also holds its ``config.json`` (and
``generation_config.json``) and, when the environment has one, the tokenizer's
files, so ``AutoModelForCausalLM.from_pretrained("RUN/checkpoints/step_N")``
and ``AutoTokenizer.from_pretrained(...)`` load it as they are: the weights are
the same ``model.safetensors`` (tied weights are stored once; ``from_pretrained``
ties them again). Why ``step_N`` and not Trainer's ``checkpoint-N``: the number
means the same (the state after N optimizer steps), but the run's history lives
in the run directory's tables, not in a ``trainer_state.json``, and ``--resume``
finds checkpoints by this name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runs import schema
from ..runs import write_json_atomic

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
REFERENCE_DIR = "reference"
KEEP_LAST = 2
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / schema.CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints (all three files present), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and all((child / f).is_file() for f in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)):
            found.append(Checkpoint(int(match.group(1)), child))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_hf_files(model: nn.Module, directory: Path, tokenizer: Any = None) -> None:
    """The files besides ``model.safetensors`` that make ``directory`` loadable with ``from_pretrained``.

    Nothing for a model that is not a Hugging Face ``PreTrainedModel`` (e.g. the tabular policy).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        return
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *, tokenizer: Any = None
) -> Path:
    from safetensors.torch import save_model

    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))  # handles tied weights
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    write_json_atomic(tmp / STATE_FILE, {"step": step, **state})
    save_hf_files(model, tmp, tokenizer)
    if final.exists():  # re-saving the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-KEEP_LAST]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def load_checkpoint(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    """Restore weights and optimizer state in place; returns the saved state dict."""
    from safetensors.torch import load_model

    load_model(model, str(checkpoint.path / MODEL_FILE), device=str(device))
    optimizer.load_state_dict(torch.load(checkpoint.path / OPTIMIZER_FILE, map_location=device, weights_only=True))
    return json.loads((checkpoint.path / STATE_FILE).read_text(encoding="utf-8"))


def reference_path(run_dir: Path) -> Path:
    return checkpoints_dir(run_dir) / REFERENCE_DIR / MODEL_FILE


def save_reference(run_dir: Path, model: nn.Module) -> None:
    from safetensors.torch import save_model

    path = reference_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)
