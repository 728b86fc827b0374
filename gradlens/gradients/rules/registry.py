"""The rules registry: ``@register_rule``, ``rule_for`` and the rows-are-independent check.

Rules are found by module type (walking the MRO) first, then by predicate, in
registration order; a module no rule claims takes the exact generic fallback
(``rerun.FALLBACK``), never a silent skip.

Precondition (checked by ``validate`` when a recorder attaches): rows are
independent along dim 0. Row i's output depends only on row i's input, so the
gradient of a group of rows is the sum of per-row pieces. Modules whose output
for one row depends on other rows (BatchNorm normalises with batch statistics)
break this, and the recorder refuses them, as Opacus's validator does.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .base import Rule
from .rerun import FALLBACK

_BY_TYPE: dict[type, Rule] = {}
_BY_PREDICATE: list[tuple[Callable[[nn.Module], bool], Rule]] = []
_BY_NAME: dict[str, Rule] = {}


def register_rule(*module_types: type, predicate: Callable[[nn.Module], bool] | None = None):
    """Decorator: ``@register_rule(MyLayer)`` on a function returning a ``Rule``.

    The rule is used for ``MyLayer`` and its subclasses (or for every module where
    ``predicate(module)`` is true). Registering a rule name or a module type twice
    raises, like the other gradlens registries. Returns the ``Rule``.
    """
    if not module_types and predicate is None:
        raise ValueError("register_rule needs module types or a predicate")

    def decorate(build: Callable[[], Rule]) -> Rule:
        rule = build()
        if not isinstance(rule, Rule):
            raise TypeError(f"@register_rule: {build.__name__} must return a Rule, got {type(rule).__name__}")
        if rule.name in _BY_NAME or rule.name == FALLBACK.name:
            raise ValueError(f"a recorder rule named {rule.name!r} is already registered")
        for t in module_types:
            if t in _BY_TYPE:
                raise ValueError(f"{t.__name__} already has the recorder rule {_BY_TYPE[t].name!r}")
        _BY_NAME[rule.name] = rule
        for t in module_types:
            _BY_TYPE[t] = rule
        if predicate is not None:
            _BY_PREDICATE.append((predicate, rule))
        return rule

    return decorate


def rule_for(module: nn.Module) -> Rule:
    """The registered rule for ``module``'s type (walking its MRO), else by predicate, else the fallback."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    for predicate, rule in _BY_PREDICATE:
        if predicate(module):
            return rule
    return FALLBACK


# Modules whose output for one row depends on other rows of the batch.
ROW_MIXING = (nn.modules.batchnorm._BatchNorm,)


def validate(model: nn.Module) -> None:
    """Refuse models that break the rows-are-independent precondition, naming the module."""
    for path, module in model.named_modules():
        if isinstance(module, ROW_MIXING):
            raise ValueError(
                f"module {path or '(model)'!r} ({type(module).__name__}) mixes the rows of a batch: its statistics are "
                "taken over dim 0, so the gradient of one group of rows is not defined on its own. gradlens needs rows "
                "that are independent along dim 0; use LayerNorm or GroupNorm instead (as Opacus requires too)"
            )
