"""Every Python block marked runnable in README.md and docs/ runs as it stands.

A block is runnable when the line right before its ```python fence is ``<!-- runnable -->``:
an HTML comment, so the marker shows neither on GitHub nor in the mkdocs site. Each block
runs in its own interpreter in a fresh empty directory, so what it registers (a reweighting)
or writes (runs/) cannot leak into other tests or the repository. The blocks build their own
tiny models and data; nothing is downloaded. Blocks without the marker (a TRL script that
loads a hub model, say) are illustrations and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MARKER = "<!-- runnable -->"
FENCE = re.compile(r"^(`{3,})")


def doc_pages() -> list[Path]:
    """README.md and the docs site's pages (docs/figures holds generated result tables, not pages)."""
    docs = sorted(p for p in (REPO / "docs").rglob("*.md") if "figures" not in p.relative_to(REPO / "docs").parts)
    return [REPO / "README.md", *docs]


def runnable_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number of the fence, code) for each marked block; a marker not followed by ```python fails."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        where = f"{page.relative_to(REPO)}:{i + 1}"
        fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
        assert fence == "```python", f"{where}: {MARKER} must be followed directly by a ```python fence, got {fence!r}"
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{where}: the runnable block is never closed"
        blocks.append((i + 2, "\n".join(lines[i + 2 : end]) + "\n"))
    return blocks


BLOCKS = [(page, line, code) for page in doc_pages() for line, code in runnable_blocks(page)]


def test_the_readme_and_the_docs_have_runnable_blocks():
    pages = {page.name for page, _, _ in BLOCKS}
    # The README's quickstart, the recorder page and the losses section must stay runnable.
    assert {"README.md", "recorder.md", "recording.md"} <= pages, f"runnable blocks only in {sorted(pages)}"


@pytest.mark.parametrize(
    ("page", "line", "code"), BLOCKS, ids=[f"{p.relative_to(REPO)}:{line}" for p, line, _ in BLOCKS]
)
def test_runnable_block_runs(page: Path, line: int, code: str, tmp_path: Path):
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (
        f"{page.relative_to(REPO)}:{line}: the runnable block failed\n--- code ---\n{code}"
        f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
    )
