"""benchmarks/device_check.sh: it parses, it skips cleanly without CUDA, and its checks run on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def test_script_parses():
    bash = shutil.which("bash")
    assert bash, "bash is needed"
    proc = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs for real (minutes)")
def test_without_cuda_it_skips_and_succeeds(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout
    assert not (tmp_path / "out").exists()  # nothing written when nothing ran


def test_exactness_checks_run_on_cpu(capsys):
    """The checks the GPU runs, here on CPU (in this process: no second interpreter start)."""
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.check_exactness(torch.device("cpu"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"check"')]
    checks = {r["check"]: r for r in map(json.loads, lines)}
    assert set(checks) == {"exactness/fp32", "exactness/bf16-weights", "exactness/bf16-autocast"}
    assert all(c["ok"] for c in checks.values()) and not module.FAILED
    assert checks["exactness/fp32"]["chosen"] <= 1e-5
