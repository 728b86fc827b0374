"""Grouping runs by a config value (the loss by default, or any dotted key such
as ``optimizer.name``) so that the runs of one group are seeds of one setting.

Pooling runs as seeds is only honest when they differ in nothing but the seed.
``split_by_settings`` looks at every other setting: runs of a group that differ
in, say, the learning rate or the data file become separate groups named by
those settings, and the differences are returned so the caller can print them.
Settings that cannot change what a run computes (its output directory, the
device, how often it checkpoints) are listed in ``NEUTRAL_SETTINGS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..runs import Run, schema

MISSING = object()

# Config keys (any part of a dotted path) that never split a group: the seed is
# what a group pools over; the rest say where or how a run was stored, not what it computed.
NEUTRAL_SETTINGS = frozenset(
    {
        "seed", "out", "device", "checkpoint_every", "output_dir", "logging_dir", "run_name", "label",
        "env_info",  # what the environment reported about its data (differs by seed), not a setting
    }
)  # fmt: skip
MAX_VALUE_CHARS = 32


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


# Keys whose values are names already: the label is the value alone ("dpo", not "loss=dpo").
NAME_KEYS = ("loss", "label")


def group_label(key: str, value: Any) -> str:
    """``dpo`` when grouping by loss (or a Langevin run's label), ``beta=0.1`` for other keys."""
    if value is MISSING:
        return f"{key}=(missing)"
    return str(value) if key in NAME_KEYS else f"{key}={value}"


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


def flat_settings(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config mappings flattened to dotted keys (lists become tuples, so they compare)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_settings(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def differing_settings(runs: Iterable[Run], *, ignore: Iterable[str] = ()) -> dict[str, list[Any]]:
    """Setting -> its distinct values, for every setting (neutral ones and ``ignore``
    excepted) on which ``runs`` disagree; a setting a run lacks counts as a value."""
    skip = set(ignore)
    flats = [flat_settings(run.config) for run in runs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    out: dict[str, list[Any]] = {}
    for key in keys:
        if key in skip or any(part in NEUTRAL_SETTINGS for part in key.split(".")):
            continue
        values = [flat.get(key, MISSING) for flat in flats]
        distinct = list(dict.fromkeys(repr(v) for v in values))
        if len(distinct) > 1:
            out[key] = sorted(dict.fromkeys(values), key=_order)
    return out


def _show(value: Any) -> str:
    text = "(missing)" if value is MISSING else str(value)
    return text if len(text) <= MAX_VALUE_CHARS else "…" + text[-(MAX_VALUE_CHARS - 1) :]


@dataclass
class Grouping:
    """Groups of runs that may be pooled as seeds, and what the grouping had to do."""

    groups: dict[str, list[Run]]
    # Original label -> settings (and their values) on which its runs differed.
    differing: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    # True when the groups were split on those settings; False when they were pooled (forced).
    split: bool = True


def _differing_within(runs: list[Run], key: str, within: str | None) -> dict[str, list[Any]]:
    if within is None:
        return differing_settings(runs, ignore={key})
    parts: dict[str, list[Run]] = {}
    for run in runs:
        parts.setdefault(repr(config_value(run.config, within)), []).append(run)
    merged: dict[str, list[Any]] = {}
    for part in parts.values():
        for name, values in differing_settings(part, ignore={key, within}).items():
            merged[name] = sorted(dict.fromkeys([*merged.get(name, []), *values]), key=_order)
    return merged


def split_by_settings(groups: Mapping[str, list[Run]], *, key: str, within: str | None = None) -> Grouping:
    """Split every group whose runs differ in a setting other than the seed into
    sub-groups labelled ``label [setting=value, ...]`` (only the differing settings).

    ``within``: a config key whose values hold different kinds of run that a
    plotter keeps apart itself (Langevin's ``mode``: single runs and sweeps);
    settings are compared only between runs with the same value of it."""
    out: dict[str, list[Run]] = {}
    differing: dict[str, dict[str, list[Any]]] = {}
    for label, runs in groups.items():
        diff = _differing_within(list(runs), key, within)
        if not diff:
            out[label] = list(runs)
            continue
        differing[label] = diff
        for run in runs:
            flat = flat_settings(run.config)
            parts = ", ".join(f"{k}={_show(flat.get(k, MISSING))}" for k in diff)
            out.setdefault(f"{label} [{parts}]", []).append(run)
    return Grouping(out, differing, split=True)


def _settings_key(run: Run) -> tuple:
    """What a run computed: its settings but the neutral ones (which say where and how it was stored)."""
    flat = flat_settings(run.config)
    return tuple(sorted((k, repr(v)) for k, v in flat.items() if not any(part in NEUTRAL_SETTINGS for part in k.split("."))))


def one_run_per_seed(groups: Mapping[str, list[Run]]) -> tuple[dict[str, list[Run]], dict[str, list[tuple[Run, Run]]]]:
    """Each seed once per group: (groups, label -> [(kept run, left-out run), ...]).

    Two runs of one group with the same seed and the same settings are copies of one
    experiment (recording the default job twice gives two seed-0 runs): counted as two
    seeds they would halve the spread and pair seeds that are not independent. The first
    run of a seed (in the order given) is kept. Runs without a seed are all kept, and so are
    runs of one seed whose settings differ (pooled by ``--group-by``, or a Langevin group's
    single run and sweep): those are different experiments, not copies.
    """
    out: dict[str, list[Run]] = {}
    repeated: dict[str, list[tuple[Run, Run]]] = {}
    for label, runs in groups.items():
        first: dict[str, Run] = {}
        for run in runs:
            seed = config_value(run.config, "seed")
            if seed is MISSING or seed is None:
                out.setdefault(label, []).append(run)
                continue
            key = repr((seed, _settings_key(run)))
            if key in first:
                repeated.setdefault(label, []).append((first[key], run))
                continue
            first[key] = run
            out.setdefault(label, []).append(run)
    return out, repeated


def describe_differences(differing: Mapping[str, Mapping[str, list[Any]]]) -> list[str]:
    """One line per original group: ``dpo: lr 1e-06 | 0.001; data a.jsonl | b.jsonl``."""
    return [
        f"{label}: " + "; ".join(f"{k} " + " | ".join(_show(v) for v in values) for k, values in diff.items())
        for label, diff in differing.items()
    ]


def split_pair(run: Run) -> tuple[str, str]:
    """The run's two split groups, (first, second): config ``groups``, else (chosen, rejected).
    ``grad/ratio`` is ||g_second|| / ||g_first||, and layers.csv's two columns are theirs."""
    value = run.config.get(schema.CONFIG_GROUPS)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return (value[0], value[1])
    return schema.DEFAULT_GROUPS


def keep_pairs_apart(groups: Mapping[str, list[Run]]) -> tuple[dict[str, list[Run]], list[str]]:
    """Groups whose runs split different pairs of groups (a DPO run's chosen/rejected, a GRPO run's
    positive/negative) are split by pair, even when pooling was asked for: their ratios measure
    different things. Returns the groups and the labels that had to be split."""
    out: dict[str, list[Run]] = {}
    split = []
    for label, runs in groups.items():
        pairs = list(dict.fromkeys(split_pair(run) for run in runs))
        if len(pairs) == 1:
            out[label] = list(runs)
            continue
        split.append(label)
        for run in runs:
            first, second = split_pair(run)
            out.setdefault(f"{label} [{first}/{second}]", []).append(run)
    return out, split
