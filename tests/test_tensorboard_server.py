"""A real `tensorboard --logdir` serves gradlens's scalar tags and custom_scalars layout."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gradlens.cli import main
from gradlens.runs import schema

pytest.importorskip("tensorboard")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensorboard_command() -> list[str]:
    exe = Path(sys.executable).with_name("tensorboard")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("tensorboard")
    return [found] if found else [sys.executable, "-m", "tensorboard.main"]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read().decode("utf-8"))


def test_tensorboard_serves_tags_and_layout(tmp_path):
    runs = tmp_path / "runs"
    assert main(["record", "--env", "tabular", "--loss", "dpo", "--steps", "4", "--quiet", "--out", str(runs / "tab")]) == 0
    port = _free_port()
    cmd = [*_tensorboard_command(), "--logdir", str(runs), "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        tags = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
                if "tab" in tags and schema.GRAD_NORM_CHOSEN in tags["tab"]:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard did not serve the run's tags within 60 s (last answer: {tags})")
        assert {schema.LOSS, schema.GRAD_NORM_REJECTED, schema.GRAD_RATIO, schema.REWARDS_MARGINS, "eval/kl_to_optimum"} <= set(tags["tab"])
        layout = _get_json(f"{base}/data/plugin/custom_scalars/layout")
        titles = [c["title"] for c in layout["category"]]
        assert "gradlens: chosen vs rejected" in titles
        chart_tags = [tag for c in layout["category"] for chart in c["chart"] for tag in chart["multiline"]["tag"]]
        assert f"^{schema.GRAD_NORM_CHOSEN}$" in chart_tags and f"^{schema.GRAD_NORM_REJECTED}$" in chart_tags
        assert "gradlens: evaluation" in titles  # written once the first evaluation showed which metrics exist
        points = _get_json(f"{base}/data/plugin/scalars/scalars?run=tab&tag={urllib.request.quote(schema.GRAD_NORM_CHOSEN, safe='')}")
        assert [p[1] for p in points] == [0, 1, 2, 3]  # [wall_time, step, value] rows
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
