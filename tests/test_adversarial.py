"""Adversarial inputs: each case ends in one clear message (file, line, problem), the
right exit code, and -- where it is refused -- a directory tree byte-identical to before.

One test per promise of docs/reliability.md; the tabular environment keeps each
recorded run to a fraction of a second.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adversarial_helpers import JOB, record, refused, tree
from gradlens.cli import main
from gradlens.record.data import load_preferences
from gradlens.runs import RunLock, load_run, read_table, schema

# ---------------------------------------------------------------- data loss and silent mixing


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    u = tmp_path / "u"
    u.mkdir()
    (u / "thesis.txt").write_text("four years of work")
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "3", "--out", str(u), "--overwrite"], 2,
            f"{u}: --overwrite refused", "not a gradlens run directory", "thesis.txt")


def test_overwrite_refuses_the_current_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.md").write_text("x")
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "3", "--out", ".", "--overwrite"], 2, "--overwrite refused", "notes.md")


def test_overwrite_refuses_foreign_files_inside_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    record(out)
    (out / schema.CHECKPOINTS / "step_3" / "my_notes.txt").write_text("mine")
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "2", "--out", str(out), "--overwrite"], 2,
            "not part of a gradlens run", "my_notes.txt", "nothing was deleted")


def test_overwrite_accepts_the_hugging_face_files_of_a_checkpoint(tmp_path):
    """A user-model checkpoint also holds save_pretrained's config and tokenizer files: run files too."""
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from gradlens.record.checkpoint import save_hf_files
    from gradlens.runs import check_overwritable, run_contents

    out = tmp_path / "run"
    record(out)
    step = out / schema.CHECKPOINTS / "step_3"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>")), unk_token="<unk>")
    tok.chat_template = "{{ messages }}"
    save_hf_files(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=2)), step, tok)
    assert len(list(step.iterdir())) > 4 and run_contents(out).foreign == []
    check_overwritable(out)
    assert main(["record", *JOB, "--steps", "2", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in (out / schema.CHECKPOINTS).iterdir()) == ["step_2"]


def test_overwrite_of_runs_in_a_parent_touches_only_those_runs(tmp_path):
    parent = tmp_path / "B"
    argv = ["record", "--env", "tabular", "--loss", "dpo,balanced", "--steps", "2", "--quiet", "--out", str(parent)]
    assert main(argv) == 0
    (parent / "notes.txt").write_text("keep me")
    (parent / "other").mkdir()
    assert main([*argv[:-4], "3", "--quiet", "--out", str(parent), "--overwrite"]) == 0
    assert (parent / "notes.txt").read_text() == "keep me" and (parent / "other").is_dir()
    assert load_run(parent / "tabular-balanced-s0").steps[schema.STEP].tolist() == [0, 1, 2]


def test_langevin_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    u = tmp_path / "u"
    u.mkdir()
    (u / "thesis.txt").write_text("x")
    argv = ["langevin", "--dim", "2", "--step", "0.01", "--steps", "5", "--particles", "0", "--no-tensorboard"]
    refused(capsys, tmp_path, [*argv, "--out", str(u), "--overwrite"], 2, f"{u}: --overwrite refused", "thesis.txt")
    run = tmp_path / "run"
    assert main([*argv, "--out", str(run)]) == 0
    assert main([*argv, "--out", str(run), "--overwrite"]) == 0  # its own run: replaced


@pytest.mark.parametrize("where", ["run", "inside", "parent"])
def test_plot_out_never_writes_into_a_run(tmp_path, capsys, where):
    run = tmp_path / "runs" / "r"
    record(run)
    out = {"run": run, "inside": run / "figs", "parent": tmp_path / "runs"}[where]
    refused(capsys, tmp_path, ["plot", str(run), "--out", str(out)], 2, f"--out {out}", "run")


def _hold_lock(path):
    code = ("import sys, time; from gradlens.runs import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_fails_at_once_naming_the_holder_pid(tmp_path, capsys):
    out = tmp_path / "run"
    record(out)
    holder = _hold_lock(out)
    try:
        t0 = time.perf_counter()
        refused(capsys, tmp_path, ["record", *JOB, "--steps", "5", "--out", str(out), "--resume"], 2,
                f"{out}: another gradlens process (PID {holder.pid}) is writing this run directory")
        assert time.perf_counter() - t0 < 10  # at once, not after waiting
        os.kill(holder.pid, signal.SIGKILL)  # a killed holder leaves no stale lock
        holder.wait()
        assert main(["record", *JOB, "--steps", "5", "--out", str(out), "--resume"]) == 0
        assert load_run(out).steps[schema.STEP].tolist() == [0, 1, 2, 3, 4]
        assert not (out / schema.LOCK).exists()
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_during_a_running_record_fails_naming_its_pid(tmp_path, capsys):
    """Two writers on one directory: the second (here --overwrite, which would wipe the first) fails at once."""
    out = tmp_path / "run"
    argv = ["record", *JOB, "--steps", "100000", "--checkpoint-every", "0", "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join(sys.path)}
    first = subprocess.Popen([sys.executable, "-m", "gradlens", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / schema.STEPS).is_file() or (out / schema.STEPS).read_bytes().count(b"\n") < 3:
            assert first.poll() is None and time.monotonic() < deadline, "the first writer did not start"
            time.sleep(0.01)
        capsys.readouterr()
        assert main([*argv, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"another gradlens process (PID {first.pid}) is writing this run directory" in err and "Traceback" not in err
        assert first.poll() is None and read_table(out / schema.STEPS)[schema.STEP].iloc[0] == 0  # untouched, still running
    finally:
        first.kill()
        first.wait()


def test_lock_is_exclusive_within_and_across_processes(tmp_path):
    with RunLock(tmp_path / "r") as lock:
        assert (tmp_path / "r" / schema.LOCK).read_text().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=f"PID {os.getpid()}"):
            RunLock(tmp_path / "r").acquire()
    assert not lock.path.exists()
    RunLock(tmp_path / "r").acquire().release()  # free again


def test_resume_refuses_when_logged_rows_have_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "2", steps=6)
    for sub in (out / schema.CHECKPOINTS).iterdir():
        for f in sub.iterdir():
            f.unlink()
        sub.rmdir()
    (out / schema.SUMMARY).unlink()
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "8", "--out", str(out), "--resume"], 2,
            "steps.csv holds 6 logged steps", "no checkpoint to continue from", "--overwrite")


def test_resume_with_a_malformed_state_json_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "2", steps=4)
    state = out / schema.CHECKPOINTS / "step_4" / "state.json"
    state.write_text('{"step": 4,\n "nonfinite_steps": "x"')
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "6", "--out", str(out), "--resume"], 2, f"{state}: line 2: not valid JSON")
    state.write_text('{"step": 4, "nonfinite_steps": "x", "wall_time_s": 1}')
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "6", "--out", str(out), "--resume"], 2, f"{state}: 'nonfinite_steps' must be")


def test_resume_with_checkpoints_as_a_file_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    record(out, steps=4)
    for sub in (out / schema.CHECKPOINTS).iterdir():
        for f in sub.iterdir():
            f.unlink()
        sub.rmdir()
    (out / schema.CHECKPOINTS).rmdir()
    (out / schema.CHECKPOINTS).write_text("oops")
    (out / schema.SUMMARY).unlink()
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "6", "--out", str(out), "--resume"], 2,
            f"{out / schema.CHECKPOINTS}: is not a directory")


def test_resume_refuses_a_changed_loss(tmp_path, capsys):
    out = tmp_path / "run"
    record(out)
    refused(capsys, tmp_path, ["record", "--env", "tabular", "--loss", "balanced", "--steps", "5", "--quiet", "--out", str(out), "--resume"], 2,
            "cannot change --loss when resuming", "'dpo'", "'balanced'")


def test_run_killed_before_config_json_counts_as_not_started(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json.tmp").write_text('{"kind": "pref')
    assert main(["record", *JOB, "--steps", "2", "--out", str(out), "--resume"]) == 0
    assert load_run(out).steps[schema.STEP].tolist() == [0, 1]
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json.tmp").write_text("")
    assert main(["record", *JOB, "--steps", "2", "--out", str(other)]) == 0  # no flag needed either
    assert not (other / "config.json.tmp").exists()


def test_partly_pruned_checkpoint_is_removed(tmp_path):
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "1", steps=3)
    half = out / schema.CHECKPOINTS / "step_1"  # a kill in the middle of pruning it
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    record(out, "--checkpoint-every", "1", "--resume", steps=4)
    assert sorted(p.name for p in (out / schema.CHECKPOINTS).iterdir()) == ["step_3", "step_4"]


# ---------------------------------------------------------------- preference data: messages, not tracebacks


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"  # data is checked before the model is loaded
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def _user(model_dir, data, out):
    return ["record", "--env", "user", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--quiet"]


def test_csv_field_longer_than_the_csv_module_default_is_read(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("prompt,chosen,rejected\n" + "p" * 200_000 + ",yes,no\n")
    assert len(load_preferences(data).records[0].prompt) == 200_000


@pytest.mark.parametrize("line,problem", [
    (b"[" * 100_000 + b"]" * 100_000, "line 2: not usable JSON (nested too deeply)"),
    (b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}', "line 2: 'prompt' holds an unpaired surrogate"),
    (b'{"prompt": ' + b"9" * 5000 + b', "chosen": "a", "rejected": "b"}', "line 2: not usable JSON"),
], ids=["nested", "surrogate", "huge-int"])
def test_bad_jsonl_lines(model_dir, tmp_path, capsys, line, problem):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + line + b"\n")
    refused(capsys, tmp_path, _user(model_dir, data, tmp_path / "out"), 2, f"{data}: {problem}")


def test_fifo_as_data_is_refused(model_dir, tmp_path, capsys):
    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)
    refused(capsys, tmp_path, _user(model_dir, fifo, tmp_path / "out"), 2, f"{fifo}: not a regular file")


def test_symlink_loop_as_data_is_named(model_dir, tmp_path, capsys):
    loop = tmp_path / "d.jsonl"
    loop.symlink_to(loop)
    err = refused(capsys, tmp_path, _user(model_dir, loop, tmp_path / "out"), 2, f"{loop}: cannot be opened")
    assert "not found" not in err


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "role", "content", "x"]) | st.text(max_size=3), inner, max_size=4),
    max_leaves=12,
)


def _reads_cleanly(path):
    before = tree(path.parent)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_preferences(path)
    except ValueError as exc:
        assert str(exc).startswith(str(path)) or str(path) in str(exc)
    assert tree(path.parent) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".csv", ".parquet"]))
def test_reader_property_arbitrary_bytes(tmp_path_factory, raw, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"d{suffix}"
    path.write_bytes(raw)
    _reads_cleanly(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(_JSON, min_size=1, max_size=4))
def test_reader_property_arbitrary_json_values(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("json") / "d.jsonl"
    path.write_text("\n".join(json.dumps(v) for v in values) + "\n", encoding="utf-8", errors="surrogatepass")
    _reads_cleanly(path)


# ---------------------------------------------------------------- checkpoints


def _damage_case(out, case):
    step = out / schema.CHECKPOINTS / "step_4"
    model, optim = step / "model.safetensors", step / "optimizer.pt"
    if case == "truncated-weights":
        model.write_bytes(model.read_bytes()[:-10])
        return model, "not a readable safetensors file"
    if case == "empty-weights":
        model.write_bytes(b"")
        return model, "not a readable safetensors file"
    if case == "wrong-shape-weights":
        from safetensors.torch import save_file

        header = json.loads(model.read_bytes()[8 : 8 + int.from_bytes(model.read_bytes()[:8], "little")])
        name = next(k for k in header if k != "__metadata__")
        save_file({name: torch.zeros(3, 3)}, str(model))
        return model, f"tensor {name!r} has shape [3, 3]"
    if case == "truncated-optimizer":
        optim.write_bytes(optim.read_bytes()[:100])
        return optim, "not a readable optimizer checkpoint"
    if case == "pickle-payload":
        torch.save({"state": {}, "param_groups": [], "evil": np.dtype("float64")}, optim)  # needs full unpickling
        return optim, "which gradlens never unpickles"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated-weights", "empty-weights", "wrong-shape-weights", "truncated-optimizer", "pickle-payload"])
def test_damaged_checkpoint_is_named_and_nothing_changes(tmp_path, capsys, case):
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "4", steps=6)
    (out / schema.SUMMARY).unlink()
    for sub in (out / schema.CHECKPOINTS).iterdir():  # keep step_4 only, so it is the one resumed from
        if sub.name != "step_4":
            for f in sub.iterdir():
                f.unlink()
            sub.rmdir()
    path, problem = _damage_case(out, case)
    err = refused(capsys, tmp_path, ["record", *JOB, "--steps", "6", "--out", str(out), "--resume"], 2, f"{path}: ", problem)
    assert "\x1b" not in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- output


def test_disk_full_is_one_message_and_keeps_the_rows(tmp_path, capsys, monkeypatch):
    from gradlens.runs import tensorboard

    calls = {"n": 0}
    original = tensorboard.TensorBoardLogger.scalars

    def full_after_two(self, step, values):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device", str(tmp_path / "run" / "events.out.tfevents.x"))
        return original(self, step, values)

    monkeypatch.setattr(tensorboard.TensorBoardLogger, "scalars", full_after_two)
    assert main(["record", *JOB, "--steps", "5", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "events.out.tfevents.x" in err and "Traceback" not in err
    assert len(read_table(tmp_path / "run" / schema.STEPS)) >= 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_out_is_one_message(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(capsys, tmp_path, ["record", *JOB, "--steps", "2", "--out", str(ro / "run")], 2, f"{ro / 'run'}: cannot create", "Permission denied")
    finally:
        ro.chmod(0o755)


def test_unwritable_out_is_one_message_even_as_root(tmp_path, capsys, monkeypatch):
    from gradlens.runs import lock

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(lock.os, "open", read_only)
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "2", "--out", str(tmp_path / "run")], 2,
            f"{tmp_path / 'run'}: cannot create or lock the run directory: Permission denied")


def test_out_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "2", "--out", str(tmp_path / "afile" / "sub")], 2, str(tmp_path / "afile"))


def test_meta_device_is_refused_before_anything_is_written(tmp_path, capsys):
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "2", "--device", "meta", "--out", str(tmp_path / "run")], 2, "--device meta")


# ---------------------------------------------------------------- flags and configs


def test_huge_seed_is_refused(tmp_path, capsys):
    refused(capsys, tmp_path, ["record", *JOB, "--seed", "99999999999999999999", "--out", str(tmp_path / "run")], 2, "--seed must be a whole number from 0 to")


def test_run_config_that_is_a_string_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    record(out)
    header = json.loads((out / schema.CONFIG).read_text())
    header["config"] = "hello"
    (out / schema.CONFIG).write_text(json.dumps(header))
    refused(capsys, tmp_path, ["plot", str(out), "--out", str(tmp_path / "figs")], 1, f"{out / schema.CONFIG}: 'config' must be a JSON object")
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "5", "--out", str(out), "--resume"], 2, f"{out / schema.CONFIG}")


# ---------------------------------------------------------------- langevin


LANGEVIN = ["langevin", "--no-tensorboard"]


def test_langevin_user_potential_raising_anything_is_one_message(tmp_path, capsys, monkeypatch):
    (tmp_path / "pot.py").write_text("def U(x):\n    raise ZeroDivisionError('boom')\n")
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, [*LANGEVIN, "--target", "user", "--potential", "pot.py:U", "--dim", "2", "--step", "0.01",
                               "--steps", "5", "--particles", "20", "--knn-every", "5", "--reference-steps", "5", "--out", str(tmp_path / "r")],
            2, "raised ZeroDivisionError: boom")


@pytest.mark.parametrize("flags,problem", [
    (["--eps", "1e-300"], "--eps 1e-300: must be a KL target from"),
    (["--dim", "1000000", "--steps", "2"], "GiB for its arrays"),
    (["--knn-k", "0", "--step", "0.01"], "--knn-k must be at least 1"),
    (["--max-rows", "0", "--step", "0.01"], "--max-rows must be at least 2"),
], ids=["tiny-eps", "huge-dim", "knn-k-0", "max-rows-0"])
def test_langevin_flags(tmp_path, capsys, flags, problem):
    refused(capsys, tmp_path, [*LANGEVIN, *flags, "--out", str(tmp_path / "r")], 2, problem)


@pytest.mark.parametrize("kind", ["text", "complex"])
def test_langevin_mean_file(tmp_path, capsys, kind):
    mean = tmp_path / ("mean.txt" if kind == "text" else "mean.npy")
    if kind == "text":
        mean.write_text("a b\n")
    else:
        np.save(mean, np.array([1 + 1j, 2]))
    np.savetxt(tmp_path / "cov.txt", np.eye(2))
    argv = [*LANGEVIN, "--dim", "2", "--mean", str(mean), "--cov", str(tmp_path / "cov.txt"), "--step", "0.01", "--out", str(tmp_path / "r")]
    refused(capsys, tmp_path, argv, 2, f"{mean}:", "complex" if kind == "complex" else "cannot read")


def test_langevin_knn_error_after_the_directory_exists_leaves_nothing(tmp_path, capsys):
    refused(capsys, tmp_path, [*LANGEVIN, "--dim", "2", "--step", "0.01", "--steps", "5", "--particles", "3", "--knn-every", "1",
                               "--out", str(tmp_path / "r")], 2, "k-NN KL with k=5 needs more than 5 particles")


def test_langevin_error_after_the_directory_exists_leaves_nothing(tmp_path, capsys, monkeypatch):
    from gradlens.langevin import runner

    def broken(*args, **kwargs):
        raise ValueError("the summary failed")

    monkeypatch.setattr(runner, "_write_rows", broken)
    refused(capsys, tmp_path, [*LANGEVIN, "--dim", "2", "--step", "0.01", "--steps", "5", "--out", str(tmp_path / "r")], 2, "the summary failed")


# ---------------------------------------------------------------- plot input


def _run_with(tmp_path, edit):
    out = tmp_path / "runs" / "r"
    record(out)
    edit(out)
    return out


def _plot(tmp_path, out):
    return ["plot", str(out), "--out", str(tmp_path / "figs")]


def test_plot_steps_without_step_column(tmp_path, capsys):
    out = _run_with(tmp_path, lambda r: (r / schema.STEPS).write_text("loss\n0.5\n"))
    refused(capsys, tmp_path, _plot(tmp_path, out), 1, f"{out / schema.STEPS}: line 1 (header): no 'step' column")


def test_plot_kind_as_a_list(tmp_path, capsys):
    def edit(r):
        header = json.loads((r / schema.CONFIG).read_text())
        header["kind"] = ["preference"]
        (r / schema.CONFIG).write_text(json.dumps(header))

    out = _run_with(tmp_path, edit)
    refused(capsys, tmp_path, _plot(tmp_path, out), 1, f"{out / schema.CONFIG}: 'kind' must be a string")


def test_plot_steps_csv_as_a_directory(tmp_path, capsys):
    def edit(r):
        (r / schema.STEPS).unlink()
        (r / schema.STEPS).mkdir()

    out = _run_with(tmp_path, edit)
    refused(capsys, tmp_path, _plot(tmp_path, out), 1, f"{out / schema.STEPS}: is a directory")


def test_plot_schema_version_from_the_future_is_refused(tmp_path, capsys):
    def edit(r):
        header = json.loads((r / schema.CONFIG).read_text())
        header["schema_version"] = 999
        (r / schema.CONFIG).write_text(json.dumps(header))

    out = _run_with(tmp_path, edit)
    refused(capsys, tmp_path, _plot(tmp_path, out), 1, f"{out / schema.CONFIG}: written by a newer gradlens (schema_version 999")


def test_plot_warns_about_a_cut_line_in_the_middle(tmp_path, capsys):
    def edit(r):
        lines = (r / schema.STEPS).read_bytes().split(b"\n")
        lines[2] = lines[2][:10]
        (r / schema.STEPS).write_bytes(b"\n".join(lines))

    out = _run_with(tmp_path, edit)
    with pytest.warns(UserWarning, match=r"steps\.csv: line\(s\) 3 do not have the header's \d+ fields .* dropped"):
        steps = load_run(out).steps  # what `gradlens plot` reads; it prints the warning
    assert steps[schema.STEP].tolist() == [0, 2]


@pytest.mark.filterwarnings("ignore:.*rows are not in step order")  # the copy follows the last step
def test_plot_warns_about_duplicate_steps(tmp_path, capsys):
    def edit(r):
        data = (r / schema.STEPS).read_bytes()
        (r / schema.STEPS).write_bytes(data + data.split(b"\n", 1)[1])

    out = _run_with(tmp_path, edit)
    with pytest.warns(UserWarning, match=r"steps\.csv: step\(s\) 0, 1, 2 appear more than once .* all rows are used as logged"):
        assert len(load_run(out).steps) == 6


def test_cut_off_header_is_reported_and_resume_recovers(tmp_path, capsys):
    out = tmp_path / "runs" / "r"
    record(out, "--checkpoint-every", "0", steps=3)
    (out / schema.SUMMARY).unlink()
    for sub in (out / schema.CHECKPOINTS).iterdir():
        for f in sub.iterdir():
            f.unlink()
        sub.rmdir()
    (out / schema.STEPS).write_bytes(b"step,lo")
    with pytest.warns(UserWarning, match="line 1 is incomplete .* the header is incomplete, so no rows are used"):
        read_table(out / schema.STEPS)
    assert main(["record", *JOB, "--steps", "3", "--out", str(out), "--resume"]) == 0
    assert load_run(out).steps[schema.STEP].tolist() == [0, 1, 2]


# ---------------------------------------------------------------- summary values


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_loss_final_is_the_last_loss_even_when_inf():
    from gradlens.analysis.summary import run_metrics

    steps = pd.DataFrame({schema.STEP: [0, 1, 2], schema.LOSS: [0.69, math.inf, math.inf]})
    metrics = run_metrics(steps)
    assert metrics["loss_final"] == math.inf and metrics["loss_nonfinite"] == 2


def test_reward_accuracy_is_nan_when_rewards_are_nan():
    from gradlens.losses import preference_loss

    nan = torch.tensor([math.nan, 0.0])
    out = preference_loss(nan, torch.zeros(2), torch.zeros(2), torch.zeros(2))
    assert math.isnan(out.metrics()[schema.REWARDS_ACCURACIES])
    fine = preference_loss(torch.tensor([1.0, -1.0]), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    assert fine.metrics()[schema.REWARDS_ACCURACIES] == 0.5
