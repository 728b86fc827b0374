"""`torchrun --nproc_per_node 2 -m gradlens record` on gloo records the global split:
per-step norms equal those of a single-process run on the same global batches."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np

from gradlens.runs import load_run

ARGS = ["--env", "tabular", "--loss", "balanced", "--steps", "6", "--batch-size", "6", "--grad-accum", "2",
        "--no-shuffle", "--eval-every", "3", "--seed", "3", "--quiet"]
COMPARED = ["loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm",
            "grad_norm/chosen", "grad_norm/rejected", "grad/dot", "grad/cosine", "weights/chosen"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_torchrun_two_processes_match_a_single_process(tmp_path):
    torchrun = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    _run([*torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "gradlens", "record",
          *ARGS, "--out", str(tmp_path / "ddp")], tmp_path)
    _run([sys.executable, "-m", "gradlens", "record", *ARGS, "--out", str(tmp_path / "single")], tmp_path)
    ddp, single = load_run(tmp_path / "ddp"), load_run(tmp_path / "single")
    assert ddp.config["world_size"] == 2 and single.config["world_size"] == 1
    assert list(ddp.steps["step"]) == list(range(6))
    for column in COMPARED:
        np.testing.assert_allclose(ddp.steps[column], single.steps[column], rtol=1e-5, atol=1e-7, err_msg=column)
    np.testing.assert_allclose(ddp.layers["chosen_sq"], single.layers["chosen_sq"], rtol=1e-5)
    np.testing.assert_allclose(ddp.evals.filter(like="eval/").to_numpy(), single.evals.filter(like="eval/").to_numpy(), rtol=1e-5)
    assert ddp.summary["status"] == "complete"
    # only rank 0 wrote: one set of TensorBoard event files
    assert len(list((tmp_path / "ddp").glob("events.out.tfevents.*"))) == 1


def test_torchrun_refuses_a_batch_smaller_than_the_world(tmp_path):
    torchrun = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "gradlens", "record",
                           "--env", "tabular", "--batch-size", "1", "--steps", "2", "--out", str(tmp_path / "x"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode != 0
    assert "smaller than the 2 processes" in proc.stderr
    assert not (tmp_path / "x").exists()
