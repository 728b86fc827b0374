"""Crash safety and --resume: SIGKILL mid-run, then continue with no gaps or duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import pandas as pd
import pytest

from gradlens.cli import main
from gradlens.runs import schema
from gradlens.runs import load_run, read_table

JOB = ["--env", "tabular", "--loss", "dpo", "--quiet"]


def _complete_rows(path) -> int:
    try:
        return max(path.read_bytes().count(b"\n") - 1, 0)
    except FileNotFoundError:
        return 0


def _kill_record_after(argv, steps_csv, rows: int, what: str) -> None:
    """Run `gradlens record argv` in a child process and SIGKILL it once steps_csv holds `rows` complete rows.

    The child must still be running when the rows are there (a run that ends first fails the
    test), and the kill is a real SIGKILL: no handler, no clean-up, as a crash or an OOM kill.
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "gradlens", "record", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    try:
        while _complete_rows(steps_csv) < rows:
            if proc.poll() is not None:
                pytest.fail(f"{what} ended (rc {proc.returncode}) before it was killed: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} wrote too few rows within 60 s")
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _assert_same_logs(a, b):
    """Byte for byte: the resumed run logged exactly what an uninterrupted run logs."""
    for table in (schema.STEPS, schema.LAYERS, schema.EVALS):
        x, y = (a / table).read_bytes(), (b / table).read_bytes()
        assert x == y, f"{table} differs"
        frame = read_table(a / table)
        assert all(dtype.kind in "if" for name, dtype in frame.dtypes.items() if name != schema.LAYER), f"{table}: non-numeric columns"


def test_sigkill_mid_run_then_resume(tmp_path):
    out = tmp_path / "run"
    steps, every = 600, 50
    argv = [*JOB, "--steps", str(steps), "--checkpoint-every", str(every), "--eval-every", "100", "--out", str(out)]
    _kill_record_after(argv, out / schema.STEPS, 2 * every + 10, "the run")

    # What the killed run left is readable: complete rows, consecutive steps, no summary.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        left = read_table(out / schema.STEPS)
        left_layers = read_table(out / schema.LAYERS)
    killed_at = len(left)
    assert killed_at >= 2 * every + 10 and killed_at < steps
    assert left[schema.STEP].tolist() == list(range(killed_at))
    assert left_layers[schema.STEP].max() <= killed_at
    assert not (out / schema.SUMMARY).exists()
    assert load_run(out).steps[schema.STEP].iloc[-1] == killed_at - 1  # plotting code can read it too

    assert main(["record", *argv, "--resume"]) == 0
    run = load_run(out)
    last = every * (killed_at // every)
    assert run.complete and run.summary["resumed_from_step"] in (last, last - every)  # - every: killed mid-checkpoint
    assert run.steps[schema.STEP].tolist() == list(range(steps))
    per_step = run.layers.groupby(schema.STEP).size()
    assert per_step.index.tolist() == list(range(steps)) and (per_step == 1).all()  # one layer: no duplicates
    assert run.evals[schema.STEP].tolist() == [0, 100, 200, 300, 400, 500, 600]

    # The resumed run logged what an uninterrupted run logs.
    full = tmp_path / "full"
    assert main(["record", *argv[:-1], str(full)]) == 0
    _assert_same_logs(out, full)


def test_resume_extends_a_finished_run_exactly(tmp_path):
    base = [*JOB, "--steps", "8", "--checkpoint-every", "3", "--eval-every", "4"]
    assert main(["record", *base, "--out", str(tmp_path / "a")]) == 0
    assert main(["record", *base, "--steps", "12", "--out", str(tmp_path / "a"), "--resume"]) == 0
    assert main(["record", *base, "--steps", "12", "--out", str(tmp_path / "b")]) == 0
    _assert_same_logs(tmp_path / "a", tmp_path / "b")
    run = load_run(tmp_path / "a")
    assert run.config["steps"] == 12 and run.summary["steps"] == 12 and run.summary["resumed_from_step"] == 8


def test_resume_without_checkpoint_starts_over(tmp_path):
    out = tmp_path / "run"
    argv = [*JOB, "--steps", "4", "--checkpoint-every", "0", "--out", str(out)]
    assert main(["record", *argv]) == 0
    # As if killed before the first checkpoint: rows exist, no checkpoint, no summary.
    for child in (out / schema.CHECKPOINTS).iterdir():
        for f in child.iterdir():
            f.unlink()
        child.rmdir()
    (out / schema.SUMMARY).unlink()
    assert main(["record", *argv, "--resume"]) == 0
    assert load_run(out).steps[schema.STEP].tolist() == [0, 1, 2, 3]


def test_resume_of_a_complete_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*JOB, "--steps", "3", "--out", str(out)]
    assert main(["record", *argv]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["record", *argv, "--resume"]) == 0
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert pd.read_csv(out / schema.STEPS)[schema.STEP].tolist() == [0, 1, 2]


def test_overwrite_replaces_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["record", *JOB, "--steps", "3", "--out", str(out)]) == 0
    (out / "stray.txt").write_text("x")  # not a run file: --overwrite refuses and deletes nothing
    assert main(["record", *JOB, "--steps", "2", "--out", str(out), "--overwrite"]) == 2
    assert "stray.txt" in capsys.readouterr().err and load_run(out).steps[schema.STEP].tolist() == [0, 1, 2]
    (out / "stray.txt").unlink()
    assert main(["record", *JOB, "--steps", "2", "--out", str(out), "--overwrite"]) == 0
    assert load_run(out).steps[schema.STEP].tolist() == [0, 1]


def test_resume_by_run_directory_alone(tmp_path):
    out = tmp_path / "run"
    assert main(["record", *JOB, "--steps", "3", "--out", str(out)]) == 0
    # No --env or --loss: the run directory's own config says what to continue.
    assert main(["record", "--out", str(out), "--resume", "--steps", "5", "--quiet"]) == 0
    run = load_run(out)
    assert run.config["env"] == "tabular" and run.steps[schema.STEP].tolist() == [0, 1, 2, 3, 4]


def test_resume_cannot_shorten_below_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["record", *JOB, "--steps", "6", "--checkpoint-every", "3", "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["record", *JOB, "--steps", "4", "--out", str(out), "--resume"]) == 2
    assert "--steps 4 is below the last checkpoint (step 6)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_default_two_loss_job_killed_in_its_first_run_is_finished_by_resume(tmp_path):
    """`gradlens record --out B` (DPO, then Balanced-DPO) killed during the DPO run:
    --resume finishes DPO from its checkpoint, then records the run that never started."""
    parent = tmp_path / "B"
    steps, every = 40, 10
    argv = ["--env", "tabular", "--quiet", "--steps", str(steps), "--checkpoint-every", str(every), "--out", str(parent)]
    first = parent / "tabular-dpo-s0"
    _kill_record_after(argv, first / schema.STEPS, every + 5, "the first run")
    assert not (parent / "tabular-balanced-s0").exists() and not (first / schema.SUMMARY).exists()

    assert main(["record", *argv, "--resume"]) == 0
    full = tmp_path / "full"
    assert main(["record", *argv[:-1], str(full)]) == 0
    for name in ("tabular-dpo-s0", "tabular-balanced-s0"):
        assert load_run(parent / name).complete
        _assert_same_logs(parent / name, full / name)
    assert load_run(first).summary["resumed_from_step"] >= every
