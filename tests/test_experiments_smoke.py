"""The experiment scripts (experiments/e*.py) run end to end in --smoke mode, and
every committed result the README and docs/results.md name exists in figures/.

Each script declares its outputs in a module-level ``FIGURES`` list (paths under
figures/); it is read with ``ast`` so the scripts are never imported here.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
SCRIPTS = sorted(p.name for p in EXPERIMENTS.glob("e[0-9]*_*.py"))
FIGURE_PATH = re.compile(r"figures/[A-Za-z0-9_.\-/]+\.(?:png|svg|pdf|csv|md|json)")


def declared_outputs(script: str) -> list[str]:
    """The script's ``FIGURES = [...]`` list of paths under figures/."""
    tree = ast.parse((EXPERIMENTS / script).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "FIGURES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"experiments/{script}: no module-level FIGURES list")


def compared_methods(script: str) -> list[str]:
    """The method names a script compares: the keys of its ``METHODS`` dict or its ``LOSSES`` tuple."""
    tree = ast.parse((EXPERIMENTS / script).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("METHODS", "LOSSES") for t in node.targets):
            if isinstance(node.value, ast.Dict):
                return [ast.literal_eval(k) for k in node.value.keys]
            return list(ast.literal_eval(node.value))
    return []


def test_every_experiment_is_found():
    assert SCRIPTS == ["e1_tabular.py", "e2_tiny_gpt2.py", "e3_langevin.py", "e4_balancing.py", "e6_grpo.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run_writes_its_outputs(script, tmp_path):
    out = tmp_path / script.removesuffix(".py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), "--smoke", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, f"{script} --smoke failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    for path in declared_outputs(script):
        written = out / "figures" / Path(path).name
        assert written.is_file() and written.stat().st_size > 0, f"{script} --smoke did not write {written.name}"


RESULTS_PAGES = ["README.md", "docs/results.md"]


def named_figure_paths(page: str) -> list[str]:
    """Paths under figures/ that a results page names (docs/figures links to the repository's figures/)."""
    return sorted(set(FIGURE_PATH.findall((REPO / page).read_text(encoding="utf-8"))))


@pytest.mark.parametrize("page", RESULTS_PAGES)
def test_every_figure_a_results_page_names_is_committed(page):
    named = named_figure_paths(page)
    assert named, f"{page} names no file under figures/: its results are gone"
    missing = [p for p in named if not (REPO / p).is_file()]
    assert not missing, f"{page} names files not in figures/ (run the experiment scripts): {missing}"


def test_every_declared_output_is_committed():
    declared = sorted({p for s in SCRIPTS for p in declared_outputs(s)})
    missing = [p for p in declared if not (REPO / p).is_file()]
    assert not missing, f"declared by the experiment scripts but not in figures/: {missing}"


def test_one_method_has_one_colour_in_every_experiment():
    # A method's colour must not depend on which other methods share the figure: E2 and E4
    # both draw Balanced-DPO on token-mean log-probs, next to different companions.
    from gradlens.plot.style import METHOD_COLORS, line_style

    compared = {s: compared_methods(s) for s in ("e1_tabular.py", "e2_tiny_gpt2.py", "e4_balancing.py")}
    assert all(compared.values()), compared
    names = sorted({m for methods in compared.values() for m in methods})
    assert not [m for m in names if m not in METHOD_COLORS], "a compared method has no fixed colour"
    assert len({METHOD_COLORS[m] for m in names}) == len(names), "two methods share a colour"
    for script, methods in compared.items():
        for method in methods:
            assert line_style(method, methods)["color"] == METHOD_COLORS[method], (script, method)
