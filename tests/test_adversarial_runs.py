"""Adversarial cases for run directories: `gradlens record` (new, --overwrite, --resume)
and the trainer integration's run log. Nothing outside a run is ever touched, nothing gradlens did
not write is deleted, and a refusal leaves the directory tree byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from adversarial_helpers import JOB, record, refused, tree
from gradlens.cli import main
from gradlens.runs import load_run, schema


def _resume(out, steps, *extra):
    return ["record", *JOB, "--steps", str(steps), "--out", str(out), "--resume", *extra]


# ---------------------------------------------------------------- pruning deletes only gradlens's checkpoints


def test_pruning_leaves_a_users_files_in_a_step_directory(tmp_path):
    """a user's folder named like a checkpoint (checkpoints/step_0 holding notes) survives pruning."""
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "1", steps=2)
    mine = out / schema.CHECKPOINTS / "step_0"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "model.safetensors").write_text("also mine")
    assert main(_resume(out, 5, "--checkpoint-every", "1")) == 0
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "model.safetensors").read_text() == "also mine"
    assert sorted(p.name for p in (out / schema.CHECKPOINTS).iterdir()) == ["step_0", "step_4", "step_5"]


def test_out_inside_another_run_is_refused(tmp_path, capsys):
    """--out RUN/checkpoints/step_5 would make a whole run look like a prunable checkpoint."""
    run = tmp_path / "run"
    record(run, "--checkpoint-every", "1", steps=2)
    inner = run / schema.CHECKPOINTS / "step_5"
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "2", "--out", str(inner)], 2, f"{inner}: lies inside the gradlens run {run}")
    refused(capsys, tmp_path, ["langevin", "--no-tensorboard", "--dim", "2", "--step", "0.01", "--steps", "5", "--out", str(inner)], 2,
            f"{inner}: lies inside the gradlens run {run}")
    link = tmp_path / "link"
    link.symlink_to(run)
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "2", "--out", str(link / "sub")], 2, "lies inside the gradlens run")


def test_symlinked_checkpoints_is_refused_and_the_folder_outside_untouched(tmp_path, capsys):
    """checkpoints/ as a link to a user's folder outside the run: resume refuses, nothing changes."""
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "1", steps=3)
    outside = tmp_path / "user_folder"
    shutil.copytree(out / schema.CHECKPOINTS, outside)
    (outside / "step_1").mkdir()
    (outside / "step_1" / "model.safetensors").write_bytes(b"the user's")
    shutil.rmtree(out / schema.CHECKPOINTS)
    (out / schema.CHECKPOINTS).symlink_to(outside)
    (out / schema.SUMMARY).unlink()
    refused(capsys, tmp_path, _resume(out, 6, "--checkpoint-every", "1"), 2, f"{out / schema.CHECKPOINTS}: is a link",
            "gradlens follows no link in a run directory")


def test_saving_through_a_linked_checkpoints_folder_is_refused(tmp_path):
    """the writer itself never writes or prunes through a linked checkpoints/ (a link made mid-run)."""
    from gradlens.record.checkpoint import prune_checkpoints, save_checkpoint

    outside = tmp_path / "outside"
    (outside / "step_1").mkdir(parents=True)
    (outside / "step_1" / "state.json").write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    (run / schema.CHECKPOINTS).symlink_to(outside)
    before = tree(outside)
    with pytest.raises(OSError, match="is a link"):
        save_checkpoint(run, 5, None, None, {})
    prune_checkpoints(run)
    assert tree(outside) == before


# ---------------------------------------------------------------- planted links are never followed


@pytest.mark.parametrize("name", [schema.LOCK, "steps.tmp", "config.json.tmp", "summary.json.tmp", schema.STEPS])
def test_resume_refuses_planted_links(tmp_path, capsys, name):
    """a link planted in a run (the lock, a temp file, a table) would make --resume overwrite its target."""
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "1", steps=3)
    (out / schema.SUMMARY).unlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    if (out / name).exists():
        (out / name).unlink()
    (out / name).symlink_to(victim)
    refused(capsys, tmp_path, _resume(out, 6), 2, f"{out / name}: is a link", "changed nothing")
    assert victim.read_text() == "precious"


def test_writers_open_no_link(tmp_path):
    """the writers themselves refuse a link (O_NOFOLLOW), should one appear after the checks."""
    from gradlens.runs import CsvTable, RunLock, write_json_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    for name in (schema.LOCK, "summary.json.tmp", "steps.tmp", schema.STEPS):
        (run / name).symlink_to(victim)
    with pytest.raises(ValueError, match="is a link"):
        RunLock(run).acquire()
    with pytest.raises(OSError):
        write_json_atomic(run / schema.SUMMARY, {"a": 1})
    table = CsvTable(run / "other.csv")
    table.path = run / schema.STEPS
    with pytest.raises(OSError):
        table.append({"step": 0})
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------- a chat template that refuses a message


_WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "hi", "there", "yes", "no", "why", "ok"]


def _tiny_model(path, chat_template=None):
    """A 1-layer GPT-2 and a word-level tokenizer, built and saved here (nothing downloaded)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(_WORDS), n_positions=32, n_embd=8, n_layer=1, n_head=2,
                               bos_token_id=2, eos_token_id=3, pad_token_id=0)).save_pretrained(path)
    return path


def test_chat_template_raise_exception_names_the_file_and_line(tmp_path, capsys):
    """the template's raise_exception (a role it does not accept) is one message with file and line."""
    model = _tiny_model(tmp_path / "model", chat_template=(
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Conversation roles must be user or assistant, not ' + m['role']) }}{% endif %}"
        "{{ m['content'] }} {% endfor %}"
    ))
    data = tmp_path / "d.jsonl"
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}]}
    bad = {**good, "prompt": [{"role": "narrator", "content": "hi there"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    err = refused(capsys, tmp_path, ["record", "--env", "user", "--model", str(model), "--data", str(data), "--out",
                                     str(tmp_path / "run"), "--quiet"], 2,
                  f"{data}: line 2: the model's chat template refused these messages: Conversation roles must be user or assistant, not narrator")
    assert "jinja" not in err.lower()


# ---------------------------------------------------------------- NaN in JSON data


@pytest.mark.parametrize("token,shown", [("NaN", "the number nan (NaN in the file)"), ("-Infinity", "the number -inf (Infinity in the file)"),
                                         ("null", "null")])
def test_json_nan_in_data_is_named_as_nan(tmp_path, capsys, token, shown):
    """JSON's non-standard NaN is reported as NaN (a number), not as a null."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": ' + token + ', "chosen": "a", "rejected": "b"}\n')
    refused(capsys, tmp_path, ["record", "--env", "user", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "r"), "--quiet"],
            2, f"{data}: line 2: 'prompt' has the wrong type ({shown})")


# ---------------------------------------------------------------- a name longer than the file system allows


@pytest.mark.parametrize("command", ["record", "langevin"])
def test_out_name_too_long_is_refused_before_anything_starts(tmp_path, capsys, command):
    """a 300-character --out name: refused as a name, with nothing created (no "rows are kept")."""
    out = tmp_path / "parent" / ("x" * 300)
    argv = (["record", *JOB, "--steps", "2"] if command == "record"
            else ["langevin", "--no-tensorboard", "--dim", "2", "--step", "0.01", "--steps", "5"])
    err = refused(capsys, tmp_path, [*argv, "--out", str(out)], 2, "is 300 bytes long, more than the 255 this file system allows",
                  "nothing was created")
    assert "rows logged so far" not in err


# ---------------------------------------------------------------- each writer continues only its own runs


def _trainer_run(path):
    from gradlens.integrations.run_log import RunLog

    log = RunLog(path, {"env": "transformers", "loss": "custom"}, columns=schema.GROUPS_STEP_COLUMNS, tensorboard=False)
    log.out.log_step({schema.STEP: 0, schema.LOSS: 0.5, schema.NONFINITE: 0})
    log.finish(steps=1)
    return path


def test_trainer_run_log_does_not_resume_a_record_run(tmp_path):
    """RunLog(resume_at=N) on a `gradlens record` run refuses before cutting rows or deleting summary.json."""
    from gradlens.integrations.run_log import RunLog

    out = tmp_path / "run"
    record(out, steps=4)
    before = tree(tmp_path)
    with pytest.raises(ValueError, match=r"recorded by gradlens record \(env 'tabular'\); a transformers trainer's run log continues only"):
        RunLog(out, {"env": "transformers", "loss": "custom"}, columns=schema.GROUPS_STEP_COLUMNS, resume_at=1)
    assert tree(tmp_path) == before and load_run(out).summary is not None
    trainer = _trainer_run(tmp_path / "trainer")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="recorded with loss 'custom', but this trainer logs 'dpo'"):
        RunLog(trainer, {"env": "transformers", "loss": "dpo"}, columns=schema.GROUPS_STEP_COLUMNS, resume_at=0)
    assert tree(tmp_path) == before
    RunLog(trainer, {"env": "transformers", "loss": "custom"}, columns=schema.GROUPS_STEP_COLUMNS, resume_at=0, tensorboard=False).close()


def test_record_resume_of_a_trainer_run_says_what_it_is(tmp_path, capsys):
    """`gradlens record --resume` on a trainer run: not "--env must be one of [...]", but what the run is."""
    trainer = _trainer_run(tmp_path / "trainer")
    err = refused(capsys, tmp_path, ["record", "--out", str(trainer), "--resume", "--steps", "5", "--quiet"], 2,
                  f"{trainer}: recorded by the transformers trainer integration (env 'transformers'), not by `gradlens record`")
    assert "--env must be one of" not in err


# ---------------------------------------------------------------- a file too large / a full disk


_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an error, not a kill
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from gradlens.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("limit,extra,culprit", [
    (3000, [], "events.out.tfevents."),
    (3000, ["--no-tensorboard"], "optimizer.pt"),
    (6000, ["--no-tensorboard"], "steps.csv"),
], ids=["event-file", "checkpoint", "steps-csv"])
def test_file_too_large_names_the_file_and_keeps_the_rows(tmp_path, limit, extra, culprit):
    """EFBIG (a file-size limit; a full disk fails the same way) names the file it hit, without a traceback."""
    import subprocess
    import sys

    from gradlens.runs import read_table

    out = tmp_path / "run"
    argv = ["record", *JOB, "--steps", "30", "--checkpoint-every", "5", "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _FSIZE.format(limit=limit), *argv], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "File too large" in proc.stderr
    line = next(l for l in proc.stderr.splitlines() if l.startswith("gradlens record: error:"))
    assert f"error: {out}/" in line and culprit in line and "the rows logged so far are kept" in line
    assert len(read_table(out / schema.STEPS, quiet=True)) >= 1


# ---------------------------------------------------------------- an unusable --device


@pytest.mark.parametrize("device", ["mps", "xpu", "hpu", "lazy"])
def test_unusable_device_is_refused_before_overwrite_touches_anything(tmp_path, capsys, device):
    """--overwrite with a device this machine lacks: refused before the old run is touched."""
    import torch

    if device == "mps" and torch.backends.mps.is_available():  # pragma: no cover - a Mac
        pytest.skip("mps works here")
    out = tmp_path / "run"
    record(out)
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "3", "--device", device, "--out", str(out), "--overwrite"], 2,
            f"--device {device}: not usable on this machine")


# ---------------------------------------------------------------- resume checks everything first


def _drop_checkpoints(out):
    shutil.rmtree(out / schema.CHECKPOINTS)


def test_resume_of_an_older_schema_changes_nothing(tmp_path, capsys):
    """steps.csv without `nonfinite` (an older gradlens): refused before steps.csv is cut, config.json noted
    or an event file added."""
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "2", steps=4)
    lines = (out / schema.STEPS).read_text().splitlines()
    assert lines[0].endswith(",nonfinite")
    (out / schema.STEPS).write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in lines))
    refused(capsys, tmp_path, _resume(out, 6), 2, f"{out / schema.STEPS}: line 1 (header): no 'nonfinite' column(s): written by an older gradlens")


def test_resume_refuses_a_finished_run_shorter_than_checkpoint_every_without_checkpoints(tmp_path, capsys):
    """3 steps with --checkpoint-every 5 end with a checkpoint at step 3; with it gone, resuming would discard the rows."""
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "5", steps=3)
    _drop_checkpoints(out)
    refused(capsys, tmp_path, _resume(out, 6), 2, "holds 3 logged steps", "of a finished run, which ends with a checkpoint")


def test_resume_uses_the_history_when_checkpoint_every_changed(tmp_path, capsys):
    """--checkpoint-every changed on an earlier resume (2, then 100): that resume, from step 4, shows a checkpoint
    existed at step 4, so rows past it with no checkpoint left are not discarded."""
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "2", steps=4)
    assert main(_resume(out, 8, "--checkpoint-every", "100")) == 0
    assert json.loads((out / schema.CONFIG).read_text())["resumes"][0]["from_step"] == 4
    _drop_checkpoints(out)
    (out / schema.SUMMARY).unlink()  # killed, as far as the files say
    refused(capsys, tmp_path, _resume(out, 10), 2, "holds 8 logged steps", "past the first checkpoint (step 4)")


def test_resume_before_the_first_checkpoint_still_starts_over(tmp_path):
    """The other side: a run killed before its first checkpoint is resumed from step 0."""
    out = tmp_path / "run"
    record(out, "--checkpoint-every", "10", steps=20)
    _drop_checkpoints(out)
    (out / schema.SUMMARY).unlink()
    lines = (out / schema.STEPS).read_text().splitlines(keepends=True)
    (out / schema.STEPS).write_text("".join(lines[:6]))  # rows 0..4 logged, killed before step_10
    assert main(_resume(out, 20, "--checkpoint-every", "10")) == 0
    assert load_run(out).steps[schema.STEP].tolist() == list(range(20))


# ---------------------------------------------------------------- the data file changed under a run


def test_resume_refuses_a_data_file_edited_in_place(tmp_path, capsys):
    """config.json keeps the data file's SHA-256; --resume on an edited file (same path) is refused."""
    import hashlib

    model = _tiny_model(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    pairs = [{"prompt": "why", "chosen": "yes", "rejected": "no"}, {"prompt": "hi", "chosen": "ok", "rejected": "no"},
             {"prompt": "hi there", "chosen": "yes yes", "rejected": "no"}]
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = tmp_path / "run"
    argv = ["record", "--env", "user", "--loss", "dpo", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet",
            "--batch-size", "2", "--checkpoint-every", "1"]
    assert main([*argv, "--steps", "2"]) == 0
    saved = json.loads((out / schema.CONFIG).read_text())["config"]["data_sha256"]
    assert saved == {"data": hashlib.sha256(data.read_bytes()).hexdigest()}
    pairs[1]["chosen"] = "yes ok"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    refused(capsys, tmp_path, [*argv, "--steps", "4", "--resume"], 2, f"{data}: its contents changed since the run was recorded",
            "nothing was changed")
    pairs[1]["chosen"] = "ok"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))  # restored: the run continues
    assert main([*argv, "--steps", "4", "--resume"]) == 0
    assert load_run(out).steps[schema.STEP].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- a kill during --overwrite


_PAUSE = """
import os, sys, time
import gradlens.runs.run_dir as rd

def pause():
    print("ready", flush=True)
    time.sleep(600)

point = os.environ["GRADLENS_TEST_KILL_AT"]
if point == "after-rename":  # the old run renamed aside, the fresh directory not made yet
    make = rd._fresh_directory
    rd._fresh_directory = lambda path: (pause(), make(path))
elif point == "before-first-row":  # the new run's files begun, no row yet
    init = rd.RunWriter.__init__
    def paused_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        pause()
    rd.RunWriter.__init__ = paused_init
elif point == "after-first-row":  # the new run has its first row; the old one not deleted yet
    discard = rd.discard_replaced
    rd.discard_replaced = lambda path: (pause(), discard(path))
from gradlens.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _without_lock(snapshot: dict) -> dict:
    return {k: v for k, v in snapshot.items() if not k.endswith(schema.LOCK)}


@pytest.mark.parametrize("point", ["after-rename", "before-first-row", "after-first-row"])
def test_kill_during_overwrite_keeps_the_old_run_or_the_new_one(tmp_path, point):
    """SIGKILL at each point of --overwrite: the old run stays whole (set aside) until the new run has a row,
    and the next command on the directory puts it back (or, once the new run has rows, discards it)."""
    import signal
    import subprocess
    import sys

    from gradlens.runs import replaced_path

    out = tmp_path / "run"
    record(out, steps=3)
    old = _without_lock(tree(out))
    aside = replaced_path(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "GRADLENS_TEST_KILL_AT": point, "PYTHONWARNINGS": "ignore"}
    argv = ["record", *JOB, "--steps", "5", "--out", str(out), "--overwrite"]
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _without_lock(tree(aside)) == old  # the old run, byte for byte, at every kill point
    if point == "after-first-row":
        assert load_run(out).steps[schema.STEP].tolist() == [0]  # and the new run has its row
        assert main(_resume(out, 5)) == 0  # continuing the new run discards the old one
        assert not aside.exists() and load_run(out).steps[schema.STEP].tolist() == [0, 1, 2, 3, 4]
        return
    with pytest.warns(UserWarning, match="an interrupted --overwrite had set this run aside"):
        assert main(_resume(out, 3)) == 0  # put back, and already complete: nothing to do
    assert _without_lock(tree(out)) == old and not aside.exists()


def test_a_finished_overwrite_leaves_nothing_aside(tmp_path):
    """once the new run has rows, the run it replaced is gone (record and langevin)."""
    from gradlens.runs import replaced_path

    out = tmp_path / "run"
    record(out, steps=3)
    record(out, "--overwrite", steps=2)
    assert not replaced_path(out).exists() and load_run(out).steps[schema.STEP].tolist() == [0, 1]
    lv = tmp_path / "lv"
    argv = ["langevin", "--no-tensorboard", "--quiet", "--dim", "2", "--step", "0.01", "--steps", "5", "--out", str(lv)]
    assert main(argv) == 0 and main([*argv, "--overwrite"]) == 0
    assert not replaced_path(lv).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lv", "run"]


def test_overwrite_of_the_current_directory_is_refused(tmp_path, capsys, monkeypatch):
    """The old run is renamed aside, and the current directory would move with it: refused, nothing changed."""
    out = tmp_path / "run"
    record(out)
    monkeypatch.chdir(out)
    refused(capsys, tmp_path, ["record", *JOB, "--steps", "3", "--out", ".", "--overwrite"], 2,
            "--overwrite refused: it is (or holds) the current directory")


def test_lora_checkpoints_with_their_adapter_are_pruned_and_overwritten(tmp_path):
    """A LoRA checkpoint's adapter/ (peft's files) is gradlens's too: pruned with its checkpoint, replaced by --overwrite."""
    from gradlens.runs import replaced_path

    model = _tiny_model(tmp_path / "model")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "why", "chosen": "yes", "rejected": "no"}\n{"prompt": "hi", "chosen": "ok", "rejected": "no"}\n')
    out = tmp_path / "run"
    argv = ["record", "--env", "user", "--loss", "dpo", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet",
            "--batch-size", "2", "--checkpoint-every", "1", "--lora-r", "2", "--lora-target-modules", "c_attn"]
    assert main([*argv, "--steps", "4"]) == 0
    assert sorted(p.name for p in (out / schema.CHECKPOINTS).iterdir()) == ["step_3", "step_4"]
    assert (out / schema.CHECKPOINTS / "step_4" / "adapter" / "adapter_model.safetensors").is_file()
    assert main([*argv, "--steps", "3", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / schema.CHECKPOINTS).iterdir()) == ["step_2", "step_3"]
    assert not replaced_path(out).exists()
