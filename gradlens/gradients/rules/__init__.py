"""Per-layer rules: one module per layer family, each a few small functions registered with ``@register_rule``.

- ``base``: what a rule is given (``Use``) and what it is (``Rule``);
- ``registry``: ``register_rule``, ``rule_for``, and the rows-are-independent check;
- ``linear`` (``nn.Linear`` and transformers' ``Conv1D``), ``embedding``,
  ``layer_norm``, ``rms_norm``: the built-in rules, registered on import;
- ``rerun``: the exact generic fallback for every other module.
"""

from . import embedding, layer_norm, linear, rms_norm  # noqa: F401  (registers the built-in rules)
from .base import IndexedRows, Probes, ProbeResult, Rule, RowSelector, Use, probe_dense, tensor_leaves
from .registry import register_rule, rule_for, validate
from .rerun import FALLBACK

__all__ = [
    "FALLBACK",
    "IndexedRows",
    "ProbeResult",
    "Probes",
    "Rule",
    "RowSelector",
    "Use",
    "probe_dense",
    "register_rule",
    "rule_for",
    "tensor_leaves",
    "validate",
]
