"""Bad input to `gradlens record`: a clear error naming the file, line/row and problem,
and nothing written -- no run directory created, an existing one byte-identical."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from gradlens.cli import main

GOOD = {"prompt": "why", "chosen": "yes", "rejected": "no"}


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def model_dir(tmp_path):
    # Data is validated before the model is loaded, so a directory with a config.json is enough here.
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def _jsonl(path, lines):
    path.write_bytes(b"".join((json.dumps(x).encode() if isinstance(x, dict) else x) + b"\n" for x in lines))
    return path


def _run(model_dir, data, out, *extra):
    return main(["record", "--env", "user", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--quiet", *extra])


CASES = {
    "missing chosen": (
        "jsonl", [GOOD, {"prompt": "why", "rejected": "no"}], "line 2: missing 'chosen' field"),
    "missing rejected": (
        "jsonl", [GOOD, GOOD, {"prompt": "why", "chosen": "yes"}], "line 3: missing 'rejected' field"),
    "missing both": (
        "jsonl", [{"prompt": "why"}], "line 1: missing 'chosen' and 'rejected' fields"),
    "empty string": (
        "jsonl", [GOOD, {"prompt": "why", "chosen": "", "rejected": "no"}], "line 2: 'chosen' is an empty string"),
    "whitespace only": (
        "jsonl", [{"prompt": "why", "chosen": "yes", "rejected": "   "}], "line 1: 'rejected' is an empty string"),
    "wrong type number": (
        "jsonl", [GOOD, {"prompt": "why", "chosen": "yes", "rejected": 3}], "line 2: 'rejected' has the wrong type (int)"),
    "wrong type null": (
        "jsonl", [{"prompt": None, "chosen": "yes", "rejected": "no"}], "line 1: 'prompt' has the wrong type (null)"),
    "bad message": (
        "jsonl", [{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}],
        "line 1: 'prompt' message 0 is not a {'role': str, 'content': str} object"),
    "mixed formats": (
        "jsonl", [{"prompt": "why", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}],
        "line 1: mixes strings and message lists"),
    "not an object": (
        "jsonl", [GOOD, b"[1, 2]"], "line 2: expected an object with ['prompt', 'chosen', 'rejected'], got list"),
    "invalid json": (
        "jsonl", [GOOD, b'{"prompt": "why",'], "line 2: not valid JSON"),
    "undecodable bytes": (
        "jsonl", [GOOD, GOOD, b'{"prompt": "caf\xe9", "chosen": "yes", "rejected": "no"}'],
        "line 3: bytes are not valid UTF-8 (byte 0xe9"),
    "csv undecodable": (
        "csv", b"prompt,chosen,rejected\nwhy,yes,no\nwhy,caf\xff,no\n", "line 3: bytes are not valid UTF-8 (byte 0xff)"),
    "csv missing column": (
        "csv", b"prompt,chosen\nwhy,yes\n", "line 1 (header): missing column(s) ['rejected']"),
    "csv empty cell": (
        "csv", b"prompt,chosen,rejected\nwhy,yes,no\nwhy,,no\n", "line 3: 'chosen' is an empty string"),
    "parquet wrong type": (
        "parquet", pd.DataFrame({"prompt": ["a", "b"], "chosen": ["x", "y"], "rejected": [1, 2]}),
        "row 1: 'rejected' has the wrong type (int)"),
    "parquet missing value": (
        "parquet", pd.DataFrame({"prompt": ["a", "b"], "chosen": ["x", None], "rejected": ["y", "z"]}),
        "row 2: missing 'chosen' field"),
    "empty file": ("jsonl", [], "no usable preference pairs (the file is empty)"),
    "all identical": ("jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}], "no usable preference pairs (1 had chosen equal to rejected)"),
}


@pytest.mark.filterwarnings("ignore:.*chosen equals rejected")
@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_refused_and_nothing_is_written(model_dir, tmp_path, capsys, case):
    kind, content, expected = CASES[case]
    data = tmp_path / f"prefs.{kind}"
    if kind == "jsonl":
        _jsonl(data, content)
    elif kind == "csv":
        data.write_bytes(content)
    else:
        content.to_parquet(data)
    before = _snapshot(tmp_path)
    out = tmp_path / "run"
    assert _run(model_dir, data, out) == 2
    err = capsys.readouterr().err
    assert f"{data}: {expected}" in err
    assert not out.exists()
    assert _snapshot(tmp_path) == before


def test_several_problems_are_listed_together(model_dir, tmp_path, capsys):
    data = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "a", "chosen": "", "rejected": "b"}, GOOD, {"prompt": "a", "chosen": 1, "rejected": "b"}])
    assert _run(model_dir, data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "2 problems in" in err and "line 1: 'chosen' is an empty string" in err and "line 3: 'chosen' has the wrong type (int)" in err


def test_missing_data_file_and_unknown_suffix(model_dir, tmp_path, capsys):
    assert _run(model_dir, tmp_path / "nope.jsonl", tmp_path / "run") == 2
    assert f"{tmp_path / 'nope.jsonl'}: preference data file not found" in capsys.readouterr().err
    txt = tmp_path / "prefs.txt"
    txt.write_text("x")
    assert _run(model_dir, txt, tmp_path / "run") == 2
    assert "unsupported file type '.txt'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_model_directory(tmp_path, capsys):
    data = _jsonl(tmp_path / "prefs.jsonl", [GOOD])
    missing = tmp_path / "no-such-model"
    assert _run(missing, data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"{missing}: model directory not found" in err and "never downloads" in err
    assert not (tmp_path / "run").exists() and not missing.exists()


def test_model_directory_without_config(tmp_path, capsys):
    data = _jsonl(tmp_path / "prefs.jsonl", [GOOD])
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert _run(empty, data, tmp_path / "run") == 2
    assert f"{empty}: not a Hugging Face model directory (no config.json)" in capsys.readouterr().err


def test_existing_run_directory_is_left_byte_identical(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["record", "--env", "tabular", "--loss", "dpo", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    assert main(["record", "--env", "tabular", "--loss", "dpo", "--steps", "3", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: run directory already exists and is not empty; pass --resume to continue it or --overwrite" in err
    assert _snapshot(out) == before


def test_overwrite_with_bad_data_keeps_the_old_run(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    data = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "a", "chosen": "", "rejected": "b"}])
    assert _run(model_dir, data, out, "--overwrite") == 2
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--env", "user"], "--env user needs --model DIR"),
        (["--env", "tabular", "--data", "x.jsonl"], "--data is only used with --env user"),
        (["--env", "tabular", "--beta", "0"], "--beta must be a positive number"),
        (["--env", "tabular", "--batch-size", "2", "--grad-accum", "3"], "--grad-accum 3 is larger than --batch-size 2"),
        (["--env", "tabular", "--loss", "ipo"], "unknown loss 'ipo'"),
        (["--env", "tabular", "--batch-size", "1000"], "--batch-size 1000 is larger than the 64 usable training pairs"),
        (["--env", "tabular", "--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    ],
)
def test_bad_flags(tmp_path, capsys, flags, expected):
    out = tmp_path / "run"
    assert main(["record", *flags, "--out", str(out), "--quiet"]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_resume_of_missing_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["record", "--env", "tabular", "--loss", "dpo", "--out", str(out), "--resume", "--quiet"]) == 2
    assert f"{out}: nothing to resume" in capsys.readouterr().err
    assert not out.exists()
