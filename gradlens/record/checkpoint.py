"""Checkpoints: safetensors weights + optimizer state, written atomically.

``checkpoints/step_N/`` holds the state after N optimizer steps (rows 0..N-1
are logged): ``model.safetensors``, ``optimizer.pt`` (tensors and plain Python
values only, loaded with ``torch.load(weights_only=True)``) and ``state.json``;
LoRA runs add ``adapter/`` (peft's ``adapter_model.safetensors`` and
``adapter_config.json``).
A checkpoint is written into a temporary directory and renamed, so a run killed
mid-write leaves the previous checkpoint intact. Every file is checked
(``read_state``, ``check_weights``, ``read_optimizer_state``) before a resumed
run changes anything. ``checkpoints/reference/``
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

import errno
import io
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..runs import schema
from ..runs import own_checkpoint_files, write_json_atomic
from ..runs.tables import named_os_error, open_nofollow

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
    if root.is_symlink():  # writing (and later pruning) through it would touch a folder outside the run
        raise OSError(errno.ELOOP, "is a link; gradlens writes checkpoints only inside the run directory", str(root))
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    _remove_own(tmp)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / MODEL_FILE))  # handles tied weights
    except Exception as exc:  # noqa: BLE001 - safetensors reports a failed write (EFBIG, ENOSPC) in its own types
        raise named_os_error(exc, tmp / MODEL_FILE) if isinstance(exc, OSError) else OSError(
            errno.EIO, f"could not be written ({type(exc).__name__}: {exc})", str(tmp / MODEL_FILE)) from None
    buffer = io.BytesIO()  # serialised in memory, so that a failed write is an OSError naming the file
    torch.save(optimizer.state_dict(), buffer)
    try:
        with open_nofollow(tmp / OPTIMIZER_FILE, "wb") as f:
            f.write(buffer.getvalue())
    except OSError as exc:
        raise named_os_error(exc, tmp / OPTIMIZER_FILE) from None
    write_json_atomic(tmp / STATE_FILE, {"step": step, **state})
    if hasattr(model, "peft_config"):
        # LoRA: model.safetensors holds peft's names (for --resume), which from_pretrained would not
        # match: no config.json beside it; the adapter and tokenizer go to adapter/ for PeftModel.from_pretrained.
        model.save_pretrained(str(tmp / ADAPTER_DIR))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / ADAPTER_DIR)
    else:
        save_hf_files(model, tmp, tokenizer)
    if final.exists() or final.is_symlink():  # re-saving the same step after a resume
        _remove_own(final)
    os.replace(tmp, final)
    prune_checkpoints(run_dir)
    return final


def prune_checkpoints(run_dir: Path) -> None:
    """Keep the KEEP_LAST newest complete checkpoints; remove every other ``step_N``.

    "Every other" includes directories a kill left half-deleted by an earlier
    prune, which ``list_checkpoints`` no longer sees as checkpoints.
    """
    root = checkpoints_dir(run_dir)
    if root.is_symlink():
        return
    keep = {c.path.name for c in list_checkpoints(run_dir)[-KEEP_LAST:]}
    if not keep:
        return
    newest = max(int(_STEP_DIR.match(name).group(1)) for name in keep)
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.name not in keep and int(match.group(1)) < newest:
            _remove_own(child, strict=False)


def _remove_own(directory: Path, *, strict: bool = True) -> None:
    """Delete checkpoint directory ``directory`` only when it holds nothing but gradlens's files
    (``own_checkpoint_files``); otherwise leave it whole.

    ``strict``: raise, naming it, instead of leaving it; pruning is not strict, since an old
    checkpoint directory left in place harms nothing.
    """
    if not directory.exists() and not directory.is_symlink():
        return
    files = own_checkpoint_files(directory)
    if files is None:
        if strict:
            raise OSError(errno.EEXIST, "holds files gradlens did not write (or is a link); it was left as it is", str(directory))
        return
    for file in files:
        file.unlink()
    if (directory / ADAPTER_DIR).is_dir():
        (directory / ADAPTER_DIR).rmdir()
    directory.rmdir()


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and the problem."""


def read_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """state.json of a checkpoint, checked field by field."""
    path = checkpoint.path / STATE_FILE
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: line 1: not valid JSON: nested too deeply") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: line 1: expected a JSON object, got {type(state).__name__}")
    checks = {
        "step": lambda v: isinstance(v, int) and not isinstance(v, bool) and v == checkpoint.step,
        "nonfinite_steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= checkpoint.step,
        "wall_time_s": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
    }
    for key, ok in checks.items():
        if key not in state or not ok(state[key]):
            expected = f"the integer {checkpoint.step} (the directory's step)" if key == "step" else "a number >= 0"
            raise CheckpointError(f"{path}: '{key}' must be {expected}, got {state.get(key, '(missing)')!r}")
    return state


def check_weights_file(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header; a truncated or empty file is refused."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError (an Exception) for any bad file
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); the checkpoint is damaged") from None


def check_weights(checkpoint: Checkpoint, model: nn.Module) -> None:
    """The weights file is a whole safetensors file whose tensors fit ``model``."""
    path = checkpoint.path / MODEL_FILE
    shapes = check_weights_file(path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, shape in shapes.items():
        if name not in expected:
            raise CheckpointError(f"{path}: holds tensor {name!r}, which the model does not have; a checkpoint of another model?")
        if shape != expected[name]:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(shape)}, the model's is {list(expected[name])}")
    stored = {t.data_ptr() for n, t in model.state_dict().items() if n in shapes}
    missing = [n for n, t in model.state_dict().items() if n not in shapes and t.data_ptr() not in stored]  # tied weights are stored once
    if missing:
        raise CheckpointError(f"{path}: lacks tensor(s) {missing[:5]} of the model; the checkpoint is incomplete")


def read_optimizer_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """optimizer.pt, loaded on the CPU with ``weights_only=True`` (nothing arbitrary is unpickled)."""
    path = checkpoint.path / OPTIMIZER_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is advice on how to load it anyway; keep only what was found.
        found = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors and plain values, which gradlens never "
            f"unpickles{f' ({found})' if found else ''}; it was not written by gradlens"
        ) from None
    except Exception as exc:  # a truncated or overwritten zip raises RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable optimizer checkpoint ({first}); the checkpoint is damaged") from None
    if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
        raise CheckpointError(f"{path}: not an optimizer state_dict (expected the keys 'state' and 'param_groups')")
    return state


def restore(checkpoint: Checkpoint, optimizer_state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Load weights and optimizer state in place (both checked by ``check_weights`` / ``read_optimizer_state``)."""
    from safetensors.torch import load_model

    path = checkpoint.path / MODEL_FILE
    try:
        load_model(model, str(path), device=str(device))
    except Exception as exc:  # noqa: BLE001 - safetensors' errors are not ValueErrors
        raise CheckpointError(f"{path}: cannot be loaded into the model ({exc})") from None
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{checkpoint.path / OPTIMIZER_FILE}: does not fit this run's optimizer ({exc})") from None


def reference_path(run_dir: Path) -> Path:
    return checkpoints_dir(run_dir) / REFERENCE_DIR / MODEL_FILE


def save_reference(run_dir: Path, model: nn.Module) -> None:
    from safetensors.torch import save_model

    path = reference_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))
    os.replace(tmp, path)
