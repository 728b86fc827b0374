"""A real ``torchrun`` with two processes on gloo: the recorded split is that of the global gradient."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import gradlens
from models import sequence_logps, tiny_gpt2

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from ddp_split import PAIRS, PROMPT, global_batch  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "ddp_split.py"


def torchrun(tmp_path, mode):
    exe = shutil.which("torchrun") or f"{sys.executable} -m torch.distributed.run"
    out = tmp_path / f"{mode}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    cmd = exe.split() + ["--nproc_per_node", "2", "--master_port", str(_free_port()), str(SCRIPT), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_reference():
    model = tiny_gpt2(torch.float64)
    rec = gradlens.GradientRecorder(model)
    ids, ref = global_batch()
    lp = sequence_logps(model, ids, PROMPT)
    loss = gradlens.preference_loss(lp[:PAIRS], lp[PAIRS:], ref[:PAIRS], ref[PAIRS:], beta=0.5, method="balanced").loss
    with rec.capture(groups={"chosen": slice(0, PAIRS), "rejected": slice(PAIRS, 2 * PAIRS)}) as cap:
        loss.backward()
    return cap


def test_torchrun_two_ranks_records_the_global_split(tmp_path):
    result = torchrun(tmp_path, "global")
    cap = single_process_reference()
    for key, value in [("chosen", cap.norm("chosen")), ("rejected", cap.norm("rejected")), ("total", cap.norm())]:
        assert math.isclose(result[key], value, rel_tol=1e-10), key
    assert math.isclose(result["dot"], cap.dot("chosen", "rejected"), rel_tol=1e-9)
    assert math.isclose(result["grad_norm"], cap.norm(), rel_tol=1e-10)  # DDP's own averaged .grad agrees
    local = torchrun(tmp_path, "local")
    assert not math.isclose(local["chosen"], cap.norm("chosen"), rel_tol=1e-3)  # per-rank mode is really per rank
