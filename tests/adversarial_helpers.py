"""Helpers of the adversarial tests: a directory tree's hash, and "refused, and nothing changed"."""

from __future__ import annotations

import hashlib

from gradlens.cli import main

JOB = ["--env", "tabular", "--loss", "dpo", "--quiet"]


def tree(root) -> dict:
    """Every file's SHA-256 and every directory under ``root`` (links by their target, never followed)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "link -> " + str(path.readlink())
        elif path.is_dir():
            out[key] = "dir"
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[key] = "other"
    return out


def refused(capsys, root, argv, code, *needles):
    """Run ``gradlens argv``; assert the exit code, the message parts and an unchanged tree."""
    before = tree(root)
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert "Traceback" not in err
    assert tree(root) == before
    return err


def record(out, *extra, steps=3):
    assert main(["record", *JOB, "--steps", str(steps), "--out", str(out), *extra]) == 0
