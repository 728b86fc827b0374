"""What the theory prescribes, and what ULA measurably needs.

* Cheng & Bartlett (2018), Theorem 1 (m-strongly convex, L-smooth, p_0 = N(0, I/m)):
  h = εm/(16 d L²), k = 16 (L²/m²)(d/ε) log(dL/(mε))  gives  KL(p_k || p*) <= ε.
  Its bound curve is the contraction e^{-mhk} KL_0 plus the discretisation term of the
  one-step analysis, written here in the form 8hdL²/m (it is ε/2 at Theorem 1's h, and
  KL_0 <= dL/(2m) from N(0, I/m), so at Theorem 1's (h, k) the curve is <= ε).
* Cheng & Bartlett (2018), Theorem 2 (convex, L-smooth), with C1 = W2(p_0, p*),
  C2 = sqrt(E_{p*}|x|²): h = (1/48) min{ε/(C1(C1+C2)L²), ε²/(C1² d L²), h0} and
  k = 2C1²/(εh) + 2C1² log(KL_0)/h (log taken as 0 when KL_0 < 1, which only lengthens k).
  h0 is the proof's step-size cap; supply it, or it defaults to 1/L.
* Vempala & Wibisono (2019), under a log-Sobolev inequality with constant α and
  L-smoothness: KL(p_k) <= e^{-αhk} KL_0 + 8hdL²/α for h <= α/(4L²) (α = m under
  m-strong convexity, where it coincides with the curve above).
* ``smallest_k_to_eps`` measures the first k with KL <= ε exactly (closed form for a
  Gaussian, the density grid for a product target); ``best_h_for_eps`` searches the
  step size that needs the fewest iterations.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .exact import grid_track, track_for
from .exact_gaussian import GaussianTrack, stationary_kl
from .targets import GaussianTarget, ProductTarget


class Theorem1(NamedTuple):
    h: float
    k: int


class Theorem2(NamedTuple):
    h: float
    k: int
    C1: float
    C2: float
    h0: float


def _positive(**values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")


def theorem1(d: int, eps: float, m: float, L: float) -> Theorem1:
    """Cheng & Bartlett's Theorem 1 step size h and iteration count k for KL <= eps."""
    _positive(d=d, eps=eps, m=m, L=L)
    if L < m:
        raise ValueError(f"L must be >= m (got m={m}, L={L})")
    h = eps * m / (16.0 * d * L * L)
    k = 16.0 * (L * L) / (m * m) * (d / eps) * math.log(d * L / (m * eps))
    return Theorem1(h, max(0, int(math.ceil(k))))


def theorem1_bound(k, h: float, d: int, m: float, L: float, kl0: float) -> np.ndarray:
    """e^{-mhk} KL_0 + 8hdL²/m at the steps k."""
    k = np.asarray(k, dtype=np.float64)
    return np.exp(-m * h * k) * kl0 + 8.0 * h * d * L * L / m


def contraction_bound(k, h: float, m: float, kl0: float) -> np.ndarray:
    """e^{-mhk} KL_0: Theorem 1's contraction term alone."""
    return np.exp(-m * h * np.asarray(k, dtype=np.float64)) * kl0


def vempala_wibisono_bound(k, h: float, d: int, alpha: float, L: float, kl0: float) -> np.ndarray:
    """e^{-αhk} KL_0 + 8hdL²/α, or NaN where it does not apply (h > α/(4L²) or no LSI)."""
    k = np.asarray(k, dtype=np.float64)
    if not (alpha and alpha > 0) or h > alpha / (4.0 * L * L):
        return np.full(k.shape, math.nan)
    return np.exp(-alpha * h * k) * kl0 + 8.0 * h * d * L * L / alpha


def vempala_wibisono(d: int, eps: float, alpha: float, L: float, kl0: float) -> Theorem1:
    """The (h, k) that make the Vempala-Wibisono bound <= eps: h = αε/(16dL²), k = log(2KL_0/ε)/(αh)."""
    _positive(d=d, eps=eps, alpha=alpha, L=L)
    h = min(alpha * eps / (16.0 * d * L * L), alpha / (4.0 * L * L))
    k = math.log(2.0 * kl0 / eps) / (alpha * h) if kl0 > eps / 2 else 0.0
    return Theorem1(h, max(0, int(math.ceil(k))))


def theorem2(d: int, eps: float, L: float, C1: float, C2: float, kl0: float, h0: float | None = None) -> Theorem2:
    """Cheng & Bartlett's Theorem 2 (convex, not strongly convex) step size and iteration count."""
    _positive(d=d, eps=eps, L=L, C1=C1)
    if not (C2 >= 0 and math.isfinite(C2)):
        raise ValueError(f"C2 must be a non-negative finite number, got {C2!r}")
    h0 = 1.0 / L if h0 is None else float(h0)
    _positive(h0=h0)
    h = min(eps / (C1 * (C1 + C2) * L * L), eps * eps / (C1 * C1 * d * L * L), h0) / 48.0
    k = 2.0 * C1 * C1 / (eps * h) + 2.0 * C1 * C1 * max(math.log(kl0), 0.0) / h if kl0 > 0 else 0.0
    return Theorem2(h, int(math.ceil(k)), C1, C2, h0)


def theorem2_for(target, eps: float, *, init_mean=None, init_cov=None, h0: float | None = None) -> Theorem2:
    """Theorem 2 with C1, C2 and KL_0 computed for the target and start (Gaussian or product)."""
    L = target.L
    if isinstance(target, GaussianTarget):
        track = GaussianTrack(target, 1.0 / L, init_mean, init_cov)  # any stable h: k = 0 does not depend on it
        m0 = track.metrics([0])
        C1, kl0 = float(m0["w2"][0]), float(m0["kl"][0])
        C2 = math.sqrt(float(np.sum(target.mean ** 2)) + float(np.sum(1.0 / target.a)))
    elif isinstance(target, ProductTarget):
        track = grid_track(target, 1.0 / L, init_mean, init_cov)
        C1, C2 = track.w2_start(), track.second_moment_target()
        kl0 = float(track.kl([0])[0])
    else:
        raise ValueError("Theorem 2's constants are computed for Gaussian and product targets; pass C1, C2 to theorem2")
    return theorem2(target.dim, eps, L, C1, C2, kl0, h0)


def smallest_k_to_eps(target, h: float, eps: float, *, init_mean=None, init_cov=None,
                      max_steps: int = 10**6) -> int | None:
    """First k with exact KL(p_k || p*) <= eps at step size h; None if it is not reached.

    Gaussian, start commuting with Σ: exact at any k (no cap). Otherwise the law is
    stepped up to ``max_steps``.
    """
    _positive(eps=eps)
    return track_for(target, h, init_mean, init_cov).first_k_below(eps, max_steps)


def _stationary_kl(target, h: float, init_mean, init_cov) -> float:
    if isinstance(target, GaussianTarget):
        return stationary_kl(target, h)
    track = track_for(target, h, init_mean, init_cov)
    return track.kl_stationary if track.n <= 1500 else 0.0  # small h: bias ~h², far below any eps asked


# Product targets: the grid's size grows as 1/√h, so h_max is searched no lower than this
# fraction of the stability limit (where the stationary bias is ~1e-8 of its size at h_cap).
_GRID_H_FLOOR = 1e-4


def best_h_for_eps(target, eps: float, *, init_mean=None, init_cov=None, max_steps: int = 10**6,
                   points: int = 24, refine: int = 30) -> tuple[float, int]:
    """The step size that reaches KL <= eps in the fewest iterations, and that count.

    Larger h converges faster but its stationary bias grows (~h²); the search runs over
    (0, h_max) where h_max is the largest h whose stationary KL is <= eps: a log-spaced
    scan, then golden-section refinement on log h around the best point. k(h) is
    measured exactly at every candidate.
    """
    _positive(eps=eps)
    h_cap = 2.0 / target.L * (1.0 - 1e-9)
    h_max = h_cap
    if _stationary_kl(target, h_cap, init_mean, init_cov) > eps:
        gaussian = isinstance(target, GaussianTarget)
        lo, hi = math.log(h_cap) + (-40.0 if gaussian else math.log(_GRID_H_FLOOR)), math.log(h_cap)
        for _ in range(60 if gaussian else 25):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _stationary_kl(target, math.exp(mid), init_mean, init_cov) <= eps else (lo, mid)
        h_max = math.exp(lo)
    cache: dict[float, float] = {}

    def k_of(log_h: float) -> float:
        if log_h not in cache:
            k = smallest_k_to_eps(target, math.exp(log_h), eps, init_mean=init_mean, init_cov=init_cov,
                                  max_steps=max_steps)
            cache[log_h] = math.inf if k is None else float(k)
        return cache[log_h]

    grid = np.linspace(math.log(h_max) - math.log(1e4), math.log(h_max) - 1e-9, points)
    ks = [math.inf] * points
    for j in range(points - 1, -1, -1):  # from the largest h down; k grows ~1/h once past the optimum
        ks[j] = k_of(grid[j])
        finite = [k for k in ks[j:] if math.isfinite(k)]
        if finite and ks[j] > 4.0 * min(finite) + 10:
            break
    i = int(np.argmin(ks))
    if not math.isfinite(ks[i]):
        raise ValueError(f"KL never reached eps={eps:g} for any step size up to {h_max:g} within {max_steps} steps")
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, points - 1)]
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(refine):
        if k_of(c) <= k_of(d):
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    best = min(cache, key=lambda g: (cache[g], -g))
    return math.exp(best), int(cache[best])
