"""The recorder benchmark's smoke mode runs and prints its table (it measures nothing here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recorder_overhead.py"


def test_recorder_overhead_smoke_prints_the_table():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--configs", "gpt2-4x256,per-row"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| smoke")]
    assert [r.split("|")[1].strip() for r in rows] == ["smoke GPT-2 2 x 32", "smoke per-row"]
    assert "MiB" in rows[0] and "naive" in rows[0] and "bit-exact" in rows[0] and "recorded+ref/plain+ref" in rows[0]
    assert "opacus-ghost" in rows[1] and "agree with Opacus" in out.stdout


def test_recorder_overhead_smoke_covers_low_precision_smollm2_and_fsdp2():
    configs = "gpt2-4x256-autocast,llama-8x512-bf16,smollm2-135m-autocast,fsdp2-llama"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--configs", configs],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| smoke")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names == ["smoke GPT-2, bf16 autocast", "smoke Llama, bf16 weights", "smoke SmolLM2 shape, bf16 autocast", "smoke FSDP2 Llama 2 x 32"]
    assert "MiB" in rows[0] and all(r.split("|")[2].strip().endswith("x") for r in rows)
