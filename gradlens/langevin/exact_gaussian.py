"""Exact law of ULA on a Gaussian target N(μ, Σ) from a Gaussian start, with no sampling.

In Σ's eigenbasis (precision eigenvalues a_i, c_i = h a_i, r_i = 1 - c_i) the iterate
y_k = Q^T(x_k - μ) is N(ν_k, S_k) with ν_{k+1} = r ∘ ν_k and S_{k+1} = R S_k R + 2h I.
Everything is tracked through the whitened deviation T_k = A^{1/2} S_k A^{1/2} - I,
whose recursion is T_{k+1} = (r r^T) ∘ T_k + diag(c²): it stays accurate when S_k is
close to the target (where KL ~ h² and a naive tr - d - log det cancels catastrophically).

* A start that commutes with Σ keeps T_k diagonal: t_k = t_∞ + r^{2k}(t_0 - t_∞), a
  geometric series, so any single k (even 10^7) costs O(d).
* Otherwise T_k is updated in O(d²) per step; KL, Fisher and W2 at a step need an
  eigen-decomposition of T_k (O(d³)), done only at the steps asked for.
* ULA's stationary law is N(μ, Σ(I - (h/2)Σ^{-1})^{-1}): t_∞ = (c/2)/(1 - c/2).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from .targets import GaussianTarget, check_step_size, default_start

_CHUNK = 1 << 21  # elements per (k, d) block in the vectorised closed form
_LEAF = 256       # k-range size below which the first-hit search evaluates every k


def t_minus_log1p(t: np.ndarray) -> np.ndarray:
    """t - log(1 + t) without cancellation near t = 0 (there it is t²/2 - t³/3 + ...)."""
    t = np.asarray(t, dtype=np.float64)
    out = t - np.log1p(t)
    small = np.abs(t) < 0.05
    if np.any(small):
        ts = t[small]
        acc = np.zeros_like(ts)
        for n in range(17, 1, -1):  # Σ_{n>=2} (-1)^n t^n / n, to t^17 (< 1e-19 relative here)
            acc = acc * ts + ((-1.0) ** n) / n
        out[small] = acc * ts * ts
    return out


def _start_in_eigenbasis(target: GaussianTarget, init_mean, init_cov):
    """Start N(init_mean, init_cov) as (ν_0, s_0 or S_0) in Σ's eigenbasis; commuting -> diagonal."""
    d = target.dim
    mean0, var0 = default_start(target)
    mean = mean0 if init_mean is None else np.broadcast_to(np.asarray(init_mean, dtype=np.float64), (d,)).copy()
    if not np.all(np.isfinite(mean)):
        raise ValueError("init_mean must be finite")
    shift = mean - target.mean
    # ν_0 = Q^T(mean - μ); a zero offset needs no rotation (it may be generated lazily, O(d³))
    nu0 = shift if target.is_diagonal or not np.any(shift) else shift @ target.Q
    if init_cov is None:
        return nu0, np.full(d, var0), None
    cov = np.asarray(init_cov, dtype=np.float64)
    if cov.ndim == 0 or (cov.ndim == 1 and cov.shape[0] == 1):
        var = float(cov.reshape(-1)[0])
        if not (var > 0 and math.isfinite(var)):
            raise ValueError(f"init_cov as a scalar variance must be positive and finite, got {var!r}")
        return nu0, np.full(d, var), None  # a multiple of I commutes with everything
    if cov.ndim == 1:
        cov = np.diag(cov)
    if cov.shape != (d, d):
        raise ValueError(f"init_cov must be a scalar, a length-{d} diagonal or a ({d}, {d}) matrix, got {cov.shape}")
    # Validate through the same rules as a target covariance (symmetric positive definite).
    GaussianTarget(np.zeros(d), cov, source="init_cov")
    S0 = cov if target.is_diagonal else target.Q.T @ cov @ target.Q
    S0 = 0.5 * (S0 + S0.T)
    off = S0 - np.diag(np.diag(S0))
    if np.max(np.abs(off), initial=0.0) <= 1e-12 * np.max(np.abs(S0)):
        return nu0, np.diag(S0).copy(), None
    return nu0, None, S0


class GaussianTrack:
    """The exact Gaussian law of ULA iterates, queried at any steps.

    ``metrics(ks)`` returns exact KL(p_k || p*), the relative Fisher information
    E_{p_k}|∇log(p_k/p*)|², and W2(p_k, p*) at the sorted steps ``ks``.
    """

    method = "closed form"
    # best_h_for_eps settings for a sweep cell: the closed form makes a fine search cheap
    BEST_H_SEARCH = dict(max_steps=10**6, points=24, refine=30)

    def __init__(self, target: GaussianTarget, h: float, init_mean=None, init_cov=None):
        check_step_size(h, target.L)
        self.target, self.h = target, float(h)
        self._start = (init_mean, init_cov)
        a = target.a
        self.a = a
        self.c = self.h * a
        if np.any(self.c >= 2.0):  # only reachable when L was supplied below max(a)
            raise ValueError(f"step size h={h:g} is at or above the stability limit 2/max(a) = {2.0 / a.max():g}")
        self.r = 1.0 - self.c
        below = self.c < 1.0
        self._log_abs_r = np.empty_like(self.c)
        self._log_abs_r[below] = np.log1p(-self.c[below])  # accurate for tiny h a
        with np.errstate(divide="ignore"):
            self._log_abs_r[~below] = np.log(self.c[~below] - 1.0)  # r <= 0; r = 0 gives -inf
        self.t_inf = 0.5 * self.c / (1.0 - 0.5 * self.c)
        self.nu0, s0, S0 = _start_in_eigenbasis(target, init_mean, init_cov)
        self.commuting = S0 is None
        self.cnu = a * self.nu0 ** 2  # a ν_0², the whitened squared mean offset
        if self.commuting:
            self.t0 = a * s0 - 1.0
            self.delta = self.t0 - self.t_inf
        else:
            sa = np.sqrt(a)
            self.T0 = sa[:, None] * S0 * sa[None, :] - np.eye(target.dim)

    # -- what a run summary reports ------------------------------------------
    @property
    def kl_at_any_k(self) -> bool:
        """True when KL at any k is a closed form (commuting start), so no iteration is needed."""
        return self.commuting

    def facts(self, ks, kl, mass, *, grid_check: bool) -> dict:
        """How the exact KL was computed, for the run summary."""
        return {"commuting_start": bool(self.commuting)}

    def with_step(self, h: float) -> "GaussianTrack | None":
        """The same target and start at step size ``h``, when its KL is a closed form at any k (else None)."""
        other = GaussianTrack(self.target, h, *self._start)
        return other if other.kl_at_any_k else None

    def sweep_limits(self, max_work: float, k: int) -> tuple[float, int]:
        """(largest step whose KL a sweep cell computes, the search limit for the first k below eps)."""
        return math.inf, 10**6

    def stationary_kl_at(self, h: float) -> float | None:
        return stationary_kl(self.target, h)

    # -- stationary law -----------------------------------------------------
    @property
    def kl_stationary(self) -> float:
        return 0.5 * float(np.sum(t_minus_log1p(self.t_inf)))

    def stationary_cov(self) -> np.ndarray:
        return stationary_cov(self.target, self.h)

    # -- closed form (commuting start) --------------------------------------
    def _u(self, k: np.ndarray) -> np.ndarray:
        """r^{2k} as a (K, d) array; exp(2k log|r|) keeps its accuracy at k ~ 10^7."""
        k = np.asarray(k, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            u = np.exp(2.0 * k[:, None] * self._log_abs_r[None, :])
        u[k == 0] = 1.0
        return u

    def _closed_form(self, ks: np.ndarray) -> dict[str, np.ndarray]:
        a = self.a
        out = {"kl": [], "fisher": [], "w2": [], "mean_sq": []}
        rows = max(1, _CHUNK // max(1, self.target.dim))
        for start in range(0, len(ks), rows):
            u = self._u(ks[start:start + rows])
            t = self.t_inf + u * self.delta
            mean_sq = u * self.nu0 ** 2
            out["kl"].append(0.5 * np.sum(t_minus_log1p(t) + u * self.cnu, axis=1))
            out["fisher"].append(np.sum(a * t * t / (1.0 + t) + a * a * mean_sq, axis=1))
            out["w2"].append(np.sqrt(np.sum(t * t / (a * (1.0 + np.sqrt(1.0 + t)) ** 2) + mean_sq, axis=1)))
            out["mean_sq"].append(np.sum(mean_sq, axis=1))
        return {key: np.concatenate(v) if v else np.zeros(0) for key, v in out.items()}

    # -- general start (O(d²) per step) --------------------------------------
    def _dense_metrics(self, T: np.ndarray, nu: np.ndarray) -> tuple[float, float, float]:
        a = self.a
        tau, V = np.linalg.eigh(0.5 * (T + T.T))
        if tau[0] <= -1.0:
            raise ValueError("covariance recursion lost positive definiteness (numerical breakdown)")
        kl = 0.5 * (np.sum(t_minus_log1p(tau)) + np.sum(a * nu ** 2))
        fisher = float(np.sum(a * ((V ** 2) @ (tau * tau / (1.0 + tau))))) + float(np.sum((a * nu) ** 2))
        # W2² = |ν|² + |A^{1/2} G - A^{-1/2}|_F², G = (A^{-1}(I + T)A^{-1})^{1/2}
        C = (1.0 / a)[:, None] * (np.eye(len(a)) + T) * (1.0 / a)[None, :]
        lam, W = np.linalg.eigh(0.5 * (C + C.T))
        G = (W * np.sqrt(np.clip(lam, 0.0, None))) @ W.T
        D = np.sqrt(a)[:, None] * G - np.diag(1.0 / np.sqrt(a))
        w2 = math.sqrt(float(np.sum(D * D)) + float(np.sum(nu ** 2)))
        return float(kl), fisher, w2

    def _states(self, last: int):
        """(k, T_k, ν_k) for k = 0..last; T and ν are updated in place (O(d²) per step)."""
        rr = np.outer(self.r, self.r)
        c2 = self.c ** 2
        T, nu = self.T0.copy(), self.nu0.copy()
        diag = np.diag_indices_from(T)
        for k in range(last + 1):
            if k:
                T *= rr
                T[diag] += c2
                nu *= self.r
            yield k, T, nu

    def _iterate(self, ks: np.ndarray) -> dict[str, np.ndarray]:
        out = {"kl": [], "fisher": [], "w2": [], "mean_sq": []}
        wanted = iter(ks.tolist())
        next_k = next(wanted, None)
        if next_k is not None:
            for k, T, nu in self._states(int(ks[-1])):
                while next_k == k:
                    kl, fisher, w2 = self._dense_metrics(T, nu)
                    for key, v in zip(out, (kl, fisher, w2, float(np.sum(nu ** 2)))):
                        out[key].append(v)
                    next_k = next(wanted, None)
        return {key: np.asarray(v, dtype=np.float64) for key, v in out.items()}

    # -- public queries -----------------------------------------------------
    def metrics(self, ks: Iterable[int]) -> dict[str, np.ndarray]:
        ks = np.asarray(list(ks) if not isinstance(ks, np.ndarray) else ks, dtype=np.int64)
        if ks.size and (ks.min() < 0 or np.any(np.diff(ks) < 0)):
            raise ValueError("steps must be non-negative and sorted")
        return self._closed_form(ks) if self.commuting else self._iterate(ks)

    def kl(self, ks: Iterable[int]) -> np.ndarray:
        return self.metrics(ks)["kl"]

    def moments(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of p_k in the original coordinates."""
        a, Q = self.a, self.target.Q
        nu = np.exp(k * self._log_abs_r) * np.sign(self.r) ** k * self.nu0 if k else self.nu0.copy()
        if self.commuting:
            t = self.t_inf + self._u(np.array([k]))[0] * self.delta
            S = np.diag((1.0 + t) / a)
        else:
            for _, T, _ in self._states(k):
                pass
            ia = 1.0 / np.sqrt(a)
            S = ia[:, None] * (np.eye(len(a)) + T) * ia[None, :]
        return self.target.mean + Q @ nu, Q @ S @ Q.T

    # -- first k with KL <= eps (exact) -------------------------------------
    def kl_lower_bound(self, k1: int, k2: float) -> float:
        """A lower bound of KL_k over k1 <= k <= k2 (k2 may be inf), commuting start only.

        Each coordinate's KL term is convex in u = r^{2k}; relaxing the coordinates'
        u to independent intervals gives a bound that is exact at single points.
        """
        u_hi = self._u(np.array([k1]))[0]
        u_lo = np.zeros_like(u_hi) if math.isinf(k2) else self._u(np.array([k2]))[0]
        delta, cnu = self.delta, self.cnu

        def g(u):
            return t_minus_log1p(self.t_inf + u * delta) + cnu * u

        with np.errstate(divide="ignore", invalid="ignore"):
            q = -cnu / delta
            u_star = (q / (1.0 - q) - self.t_inf) / delta
        ok = (delta != 0) & (q < 1.0) & np.isfinite(u_star)
        u_star = np.where(ok, np.clip(u_star, u_lo, u_hi), u_lo)
        return 0.5 * float(np.sum(np.minimum(np.minimum(g(u_lo), g(u_hi)), g(u_star))))

    def first_k_below(self, eps: float, max_steps: int = 10**6) -> int | None:
        """Smallest k with KL(p_k || p*) <= eps, or None if it never happens.

        Commuting start: exact branch-and-bound over k in [0, 2^62) with the bound above
        (no monotonicity assumed). Otherwise: step through the recursion up to max_steps.
        """
        if not self.commuting:
            for k, T, nu in self._states(max_steps):
                tau = np.linalg.eigvalsh(0.5 * (T + T.T))
                if 0.5 * (np.sum(t_minus_log1p(tau)) + np.sum(self.a * nu ** 2)) <= eps:
                    return k
            return None
        if self.kl([0])[0] <= eps:
            return 0
        slack = eps * (1.0 + 1e-12)
        for j in range(63):
            k1, k2 = 1 << j, (1 << (j + 1)) - 1
            if self.kl_lower_bound(k1, math.inf) > slack:
                return None
            hit = self._search(k1, k2, eps, slack)
            if hit is not None:
                return hit
        return None

    def _search(self, k1: int, k2: int, eps: float, slack: float) -> int | None:
        if self.kl_lower_bound(k1, k2) > slack:
            return None
        if k2 - k1 < _LEAF:
            ks = np.arange(k1, k2 + 1)
            hit = np.flatnonzero(self.kl(ks) <= eps)
            return int(ks[hit[0]]) if hit.size else None
        mid = (k1 + k2) // 2
        left = self._search(k1, mid, eps, slack)
        return left if left is not None else self._search(mid + 1, k2, eps, slack)


def stationary_cov(target: GaussianTarget, h: float) -> np.ndarray:
    """Covariance of ULA's stationary law: Σ(I - (h/2)Σ^{-1})^{-1}."""
    check_step_size(h, target.L)
    var = 1.0 / (target.a * (1.0 - 0.5 * h * target.a))
    return (target.Q * var) @ target.Q.T


def stationary_kl(target: GaussianTarget, h: float) -> float:
    """KL(N(μ, Σ(I - (h/2)Σ^{-1})^{-1}) || N(μ, Σ)): the bias ULA never removes, O(h²)."""
    check_step_size(h, target.L)
    c = h * target.a
    return 0.5 * float(np.sum(t_minus_log1p(0.5 * c / (1.0 - 0.5 * c))))
