"""docs/run-format.md documents every name the run-directory schema defines.

The page is the user's contract for the files a run writes; gradlens/runs/schema.py is the
code's. A column, evaluation name or summary key added to the schema without a line in the
page fails here, and so does a page whose steps.csv column order differs from the writer's.
"""

from __future__ import annotations

import re
from pathlib import Path

from gradlens.runs import schema

PAGE = Path(__file__).resolve().parent.parent / "docs" / "run-format.md"


def code_spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def documented_names(text: str) -> set[str]:
    """Every name in an inline code span; a span like `step, loss, lr` names three."""
    return {name.strip() for span in code_spans(text) for name in span.split(",") if name.strip()}


def test_every_schema_name_is_documented():
    names = documented_names(PAGE.read_text(encoding="utf-8"))
    evals = [value for key, value in vars(schema).items() if key.startswith("EVAL_") and isinstance(value, str)]
    layer_columns = [schema.STEP, schema.LAYER, schema.CHOSEN_SQ, schema.REJECTED_SQ, schema.DOT]
    files = [schema.CONFIG, schema.STEPS, schema.LAYERS, schema.EVALS, schema.SUMMARY, schema.ROWS, schema.LOCK]
    expected = {
        "steps.csv column": schema.PREFERENCE_STEP_COLUMNS,
        "trainer steps.csv column": schema.GROUPS_STEP_COLUMNS,
        "GRPO/RLOO steps.csv column": (*schema.ADVANTAGE_STEP_COLUMNS, schema.group_norm_column(schema.ZERO)),
        "KTO steps.csv column": schema.KTO_STEP_COLUMNS,
        "reward-model steps.csv column": schema.REWARD_MODEL_STEP_COLUMNS,
        "config.json key": [schema.CONFIG_GROUPS],
        "layers.csv column": layer_columns,
        "rows.csv column": schema.ROW_COLUMNS,
        "evals.csv column": evals,
        "summary.json key": schema.SUMMARY_KEYS,
        "file": files,
        "status": [schema.STATUS_COMPLETE, schema.STATUS_NONFINITE],
    }
    assert evals, "schema defines no EVAL_* names: the test would check nothing"
    missing = [f"{what} {name!r}" for what, group in expected.items() for name in group if name not in names]
    assert not missing, f"docs/run-format.md does not document: {', '.join(missing)}"


def test_the_documented_steps_column_order_is_the_writers():
    spans = [span for span in code_spans(PAGE.read_text(encoding="utf-8")) if span.startswith(f"{schema.STEP}, {schema.LOSS}, ")]
    order = [tuple(name.strip() for name in span.split(",")) for span in spans]
    assert tuple(schema.PREFERENCE_STEP_COLUMNS) in order, f"no span lists steps.csv's columns in order; found {order}"
