"""gradlens: exact chosen/rejected gradient splits for preference optimisation,
run logs and TensorBoard dashboards, analysis and plots, and Langevin KL tracking.

The top-level names are imported lazily, so ``gradlens plot`` starts without torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "GradientRecorder": "gradlens.gradients",
    "PreferenceLossOutput": "gradlens.losses",
    "preference_loss": "gradlens.losses",
    "register_reweighting": "gradlens.losses",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradlens' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
