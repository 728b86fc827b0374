"""Particle samplers: ULA vectorised over particles, and MALA for reference draws from p*.

ULA:  x_{k+1} = x_k - h ∇U(x_k) + √(2h) ξ_k, every particle at once (float64).
MALA: the same proposal with a Metropolis correction, so its stationary law is p*
exactly; it supplies the reference sample the k-NN KL estimator compares against
when p* can only be evaluated, not sampled (user potentials).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .targets import check_step_size

PotentialFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def gaussian_particles(n: int, mean: np.ndarray, cov, rng: np.random.Generator) -> np.ndarray:
    """n draws from N(mean, cov); cov is a scalar variance, a diagonal vector or a matrix."""
    d = mean.shape[0]
    z = rng.standard_normal((n, d))
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim == 0:
        return mean + math.sqrt(float(cov)) * z
    if cov.ndim == 1:
        return mean + np.sqrt(cov) * z
    return mean + z @ np.linalg.cholesky(cov).T


class ULASampler:
    """ULA particles. ``grad_norm_mean`` is the mean |∇U| at the current iterate."""

    def __init__(self, potential_and_grad: PotentialFn, h: float, x0: np.ndarray, *, seed: int = 0,
                 L: float | None = None):
        check_step_size(h, L)
        self.fn, self.h = potential_and_grad, float(h)
        self.x = np.array(x0, dtype=np.float64)
        if self.x.ndim != 2:
            raise ValueError(f"particles must have shape (N, d), got {self.x.shape}")
        self.rng = np.random.default_rng(seed)
        self.k = 0
        self._noise = math.sqrt(2.0 * self.h)
        self._evaluate()

    def _evaluate(self) -> None:
        try:
            self.U, self.grad = self.fn(self.x)
        except ValueError as exc:
            raise ValueError(f"ULA iteration {self.k}: {exc}") from None
        if not (np.all(np.isfinite(self.U)) and np.all(np.isfinite(self.grad))):
            raise ValueError(f"ULA iteration {self.k}: non-finite potential or gradient (the chain diverged)")

    @property
    def grad_norm_mean(self) -> float:
        return float(np.mean(np.sqrt(np.einsum("ij,ij->i", self.grad, self.grad))))

    def step(self) -> None:
        self.x -= self.h * self.grad
        self.x += self._noise * self.rng.standard_normal(self.x.shape)
        self.k += 1
        self._evaluate()

    def run(self, steps: int) -> np.ndarray:
        for _ in range(steps):
            self.step()
        return self.x


def mala_samples(potential_and_grad: PotentialFn, x0: np.ndarray, steps: int, *, h: float = 0.1,
                 seed: int = 0, target_accept: float = 0.574) -> tuple[np.ndarray, dict]:
    """Run MALA chains from x0 and return their final states: draws from p* after burn-in.

    The step size adapts (on log h, towards ``target_accept``) during the first half
    and is frozen for the second half, so the chains end under a fixed exact kernel.
    """
    rng = np.random.default_rng(seed)
    x = np.array(x0, dtype=np.float64)
    U, g = potential_and_grad(x)
    log_h = math.log(h)
    accepted = []
    for k in range(steps):
        hk = math.exp(log_h)
        y = x - hk * g + math.sqrt(2.0 * hk) * rng.standard_normal(x.shape)
        Uy, gy = potential_and_grad(y)
        # log q(x | y) - log q(y | x) for the Gaussian proposal N(z - h ∇U(z), 2h I)
        fwd = np.sum((y - x + hk * g) ** 2, axis=1)
        bwd = np.sum((x - y + hk * gy) ** 2, axis=1)
        log_alpha = -(Uy - U) - (bwd - fwd) / (4.0 * hk)
        accept = np.log(rng.random(x.shape[0])) < log_alpha
        x[accept], U[accept], g[accept] = y[accept], Uy[accept], gy[accept]
        rate = float(np.mean(accept))
        if k < steps // 2:
            log_h += (rate - target_accept) / math.sqrt(k + 1.0)
        else:
            accepted.append(rate)
    info = {"steps": steps, "h": math.exp(log_h), "acceptance": float(np.mean(accepted)) if accepted else math.nan}
    return x, info
