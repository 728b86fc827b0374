"""The environment registry: every ``gradlens record --env`` choice and what it implies.

An environment module registers its class with ``@register_env``, giving its
one-line help, the defaults of the settings ``RecordConfig`` leaves ``None``,
and the flags it accepts. The CLI's ``--env`` choices and help text, the
per-environment defaults, the checks of ``config.validate`` and the thread
setting of ``command`` all read this registry. The environments themselves are
the modules of this package, found on first use: adding one is one new module.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, fields
from typing import Any, Callable

# Modules of this package that define no environment.
_NOT_ENVIRONMENTS = frozenset({"base", "registry"})


@dataclass(frozen=True)
class EnvDefaults:
    """The environment's values for the RecordConfig fields left ``None`` (all required: none is forgotten)."""

    lr: float
    optimizer: str
    batch_size: int
    steps: int
    eval_every: int
    checkpoint_every: int
    max_length: int
    sft_steps: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class EnvSpec:
    """One registered environment.

    ``cls(cfg, reference_weights=..., log=..., progress=...)`` builds it. ``small``:
    its model is tiny, so one CPU thread is fastest (extra threads only add
    synchronisation). ``model_and_data``: it trains the user's ``--model`` on
    ``--data`` (both required; the column flags apply). ``lora`` / ``fsdp``: it
    accepts ``--lora-r`` / ``--fsdp``.
    """

    name: str
    cls: type
    help: str
    defaults: EnvDefaults
    small: bool = False
    model_and_data: bool = False
    lora: bool = False
    fsdp: bool = False


ENVS: dict[str, EnvSpec] = {}


def register_env(
    name: str, *, help: str, defaults: EnvDefaults, small: bool = False, model_and_data: bool = False,
    lora: bool = False, fsdp: bool = False,
) -> Callable[[type], type]:  # fmt: skip
    """Register an environment class under ``name`` (its ``--env`` value); a duplicate name raises.

    The class is returned unchanged apart from ``cls.name = name``, so it can still be built directly.
    """

    def decorate(cls: type) -> type:
        if name in ENVS:
            raise ValueError(f"environment {name!r} is already registered")
        cls.name = name
        ENVS[name] = EnvSpec(name, cls, help, defaults, small, model_and_data, lora, fsdp)
        return cls

    return decorate


_loaded = False


def load_envs() -> dict[str, EnvSpec]:
    """Import every environment module of this package once (each registers itself); the registry by name
    (sorted, so the CLI's order does not depend on which module happened to be imported first)."""
    global _loaded
    if not _loaded:
        _loaded = True
        package = __name__.rpartition(".")[0]
        for module in sorted(m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__)):
            if module not in _NOT_ENVIRONMENTS and not module.startswith("_"):
                importlib.import_module(f"{package}.{module}")
    return dict(sorted(ENVS.items()))


def env_names() -> tuple[str, ...]:
    """What --env accepts."""
    return tuple(load_envs())


def get_env(name: str) -> EnvSpec:
    """The registered environment ``name``; an unknown name lists the registry."""
    if name not in load_envs():
        raise ValueError(f"--env must be one of {list(load_envs())}, got {name!r}")
    return ENVS[name]


def envs_with(flag: str) -> tuple[str, ...]:
    """The environments whose spec sets ``flag`` (``small``, ``model_and_data``, ``lora``, ``fsdp``)."""
    return tuple(name for name, spec in load_envs().items() if getattr(spec, flag))


def per_env(field: str) -> str:
    """Help text for a default that depends on the environment: 'tabular 0.05, tiny-gpt2 0.001, user 1e-6'."""
    return ", ".join(f"{name} {_shown(getattr(spec.defaults, field))}" for name, spec in load_envs().items())


def _shown(value: Any) -> str:
    return f"{value:g}".replace("e-0", "e-") if isinstance(value, float) else str(value)
