"""Recording: hooks that split a backward pass into row groups, and the per-layer rules registry.

Imports nothing from the rest of gradlens.
"""

from .capture import Capture, UnattributedGradientWarning
from .groups import RowGroups, make_groups
from .recorder import GradientRecorder
from .rules import FALLBACK, Rule, Use, register_rule, rule_for

__all__ = [
    "Capture",
    "GradientRecorder",
    "RowGroups",
    "Rule",
    "Use",
    "UnattributedGradientWarning",
    "FALLBACK",
    "make_groups",
    "register_rule",
    "rule_for",
]
