"""Checkpoints: safetensors weights + optimizer state, written atomically.

``checkpoints/step_N/`` holds the state after N optimizer steps (rows 0..N-1
are logged): ``model.safetensors``, ``optimizer.pt`` (tensors and plain Python
values only, loaded with ``torch.load(weights_only=True)``) and ``state.json``;
LoRA runs add ``adapter/`` (peft's ``adapter_model.safetensors`` and
``adapter_config.json``).
A checkpoint is written into a temporary directory and renamed, so a run killed
mid-write leaves the previous checkpoint intact. ``checkpoints/reference/``
holds the starting policy of environments whose warm-start is not
bit-reproducible, so a resumed run uses exactly the same reference.
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
ADAPTER_DIR = "adapter"
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


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    from safetensors.torch import save_model

    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))  # handles tied weights
    if hasattr(model, "peft_config"):  # LoRA: also the adapter alone, loadable with peft.PeftModel.from_pretrained
        model.save_pretrained(str(tmp / ADAPTER_DIR))
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    write_json_atomic(tmp / STATE_FILE, {"step": step, **state})
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
