"""RMSNorm: y = x · rsqrt(mean(x²) + eps) · w, so a group's weight gradient is its row sum of g ⊙ x̂.

Chosen by what the module computes, not by its class name: a module whose only
parameter is a 1-D ``weight`` of the hidden size, with an ``eps`` (or
``variance_epsilon``) attribute, and whose forward, run once at attach time on
a small random input and a random weight, gives x · rsqrt(mean(x²) + eps) · w.
transformers' ``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``MistralRMSNorm``,
``T5LayerNorm`` and torch's ``nn.RMSNorm`` pass; Gemma's (1 + w) variant and
anything else fail and take the exact fallback (so does a float64
``T5LayerNorm``, whose float32 variance scales a float64 x).

x̂ is formed the way the module forms it: in float32, then rounded to the
input's dtype before the product with w (bf16 models see a bf16 x̂). For
float64 inputs some forwards (Llama's) still compute x̂ in float32 and others
(``nn.RMSNorm``) in float64; for a float64 module the attach-time check runs a
float64 input too and notes which, so float64 models split to float64 rounding.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn as nn
from torch.func import functional_call

from ..precision import no_autocast
from .base import Rule, Use
from .layer_norm import row_sum_rule
from .registry import register_rule


def _eps(module: nn.Module) -> Optional[float]:
    """The module's epsilon; for ``nn.RMSNorm(eps=None)``, float32's (checked on a float32 input)."""
    for attr in ("eps", "variance_epsilon"):
        if hasattr(module, attr):
            eps = getattr(module, attr)
            if eps is None and isinstance(module, nn.RMSNorm):
                return torch.finfo(torch.float32).eps
            return float(eps) if isinstance(eps, (int, float)) else None
    return None


# Modules found to form x̂ in float32 even for float64 inputs (filled by ``is_rms_norm``).
_FLOAT32_FOR_FLOAT64: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def rms_hat(x: torch.Tensor, eps: float, float32_for_float64: bool = False) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) over the last dim, in float32 (float64 inputs: float64, unless
    ``float32_for_float64``), returned in that compute dtype."""
    wide = x.dtype == torch.float64 and not float32_for_float64
    xf = x.to(torch.float64 if wide else torch.float32)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def _forward(module: nn.Module, x: torch.Tensor, w: torch.Tensor):
    try:
        with torch.no_grad(), no_autocast():
            y = functional_call(module, {"weight": w}, (x,))
    except Exception:  # a forward that needs more than one tensor, or other inputs: not this formula
        return None
    return y if isinstance(y, torch.Tensor) and y.shape == x.shape else None


# module -> ((weight dtype, eps), verdict): the check runs once per module, not at every attach.
_VERDICTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def is_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` computes x · rsqrt(mean(x²) + eps) · w over its last dim (see the module docstring)."""
    weight = getattr(module, "weight", None)
    key = (getattr(weight, "dtype", None), _eps(module))
    known = _VERDICTS.get(module)
    if known is not None and known[0] == key:
        return known[1]
    verdict = _check(module)
    _VERDICTS[module] = (key, verdict)
    return verdict


def _check(module: nn.Module) -> bool:
    own = dict(module.named_parameters(recurse=False))
    eps = _eps(module)
    if list(own) != ["weight"] or own["weight"].dim() != 1 or eps is None or eps < 0:
        return False
    width = own["weight"].shape[0]
    device = own["weight"].device
    if device.type == "meta":
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, width, generator=gen)
    w = torch.rand(width, generator=gen) + 0.5
    # At scale sqrt(eps) the mean square is about eps: a wrong eps (or none) shows at O(1).
    for scale in (1.0, math.sqrt(eps) if eps > 0 else 1.0):
        xs, ws = (x * scale).to(device), w.to(device)
        y = _forward(module, xs, ws)
        want = rms_hat(xs, eps) * ws
        if y is None or not torch.allclose(y.float(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item()):
            return False
    if own["weight"].dtype != torch.float64:
        return True
    # A float64 model: x̂ in float64, or in float32 and widened (Llama)?
    x64, w64 = x.to(device, torch.float64), w.to(device, torch.float64)
    y = _forward(module, x64, w64)
    if y is None:
        return False
    for narrow in (False, True):
        want = rms_hat(x64, eps, narrow).to(torch.float64) * w64
        if torch.allclose(y.to(torch.float64), want, rtol=1e-12, atol=0.0):
            _FLOAT32_FOR_FLOAT64[module] = narrow
            return True
    return False


def rms_norm_terms(use: Use) -> dict[str, torch.Tensor]:
    """{weight: g ⊙ x̂} for every token, as (N, tokens, width); memoised for this use."""
    if "terms" not in use.memo:
        x = use.input()
        n, width = x.shape[0], x.shape[-1]
        narrow = _FLOAT32_FOR_FLOAT64.get(use.module, False)
        known = _VERDICTS.get(use.module)
        eps = known[0][1] if known is not None else _eps(use.module)
        xhat = rms_hat(x, eps, narrow).to(x.dtype).to(use.dtype)  # rounded like the module's own x̂
        g = use.grad().to(use.dtype)
        use.memo["terms"] = {"weight": (g * xhat).reshape(n, -1, width)}
    return use.memo["terms"]


@register_rule(predicate=is_rms_norm)
def _rms_norm() -> Rule:
    return row_sum_rule("rmsnorm", rms_norm_terms)
