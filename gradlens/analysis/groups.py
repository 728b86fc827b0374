"""Grouping runs by a config value (the loss by default, or any dotted key such
as ``optimizer.name``) so that the runs of one group are seeds of one setting."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..runs import Run

MISSING = object()


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]``; a dotted key walks nested mappings when no literal key matches."""
    if key in config:
        return config[key]
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return MISSING
        node = node[part]
    return node


def group_label(key: str, value: Any) -> str:
    """``dpo`` when grouping by loss, ``beta=0.1`` for other keys."""
    if value is MISSING:
        return f"{key}=(missing)"
    return str(value) if key == "loss" else f"{key}={value}"


def _order(value: Any) -> tuple:
    # Numbers sort numerically, then strings alphabetically, missing last.
    if value is MISSING:
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def group_runs(runs: Iterable[Run], key: str = "loss") -> dict[str, list[Run]]:
    """Runs grouped by ``config[key]``, groups in sorted order, runs in the order given.

    Raises ValueError when no run has the key (naming the keys that exist).
    """
    runs = list(runs)
    values = [config_value(run.config, key) for run in runs]
    if runs and all(v is MISSING for v in values):
        known = sorted({k for run in runs for k in run.config})
        raise ValueError(f"no run has config key {key!r}; keys present: {', '.join(known) or '(none)'}")
    groups: dict[str, list[Run]] = {}
    for value, run in sorted(zip(values, runs), key=lambda vr: _order(vr[0])):
        groups.setdefault(group_label(key, value), []).append(run)
    return groups
