"""Exact KL(p_k || p*) for the targets that allow it: one entry point over both trackers.

Gaussian targets use the closed form (``exact_gaussian``), product targets the density
grid (``grid``). User potentials have no exact KL; they get the k-NN estimate.
"""

from __future__ import annotations

import numpy as np

from .exact_gaussian import GaussianTrack
from .grid import GridTrack
from .targets import GaussianTarget, ProductTarget


def exact_kl(target, h: float, steps: int, init_mean=None, init_cov=None) -> np.ndarray:
    """KL(p_k || p*) for k = 0..steps, exactly (float64); the default start is N(0, I/m)."""
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    return track_for(target, h, init_mean, init_cov).kl(np.arange(int(steps) + 1))


def grid_track(target: ProductTarget, h: float, init_mean=None, init_cov=None, resolution: float = 1.0) -> GridTrack:
    mean = 0.0 if init_mean is None else _scalar(init_mean, "init_mean")
    var = None if init_cov is None else _scalar(init_cov, "init_cov")
    return GridTrack(target, h, mean, var, resolution=resolution)


def _scalar(value, name: str) -> float:
    """Product targets need an isotropic start: one mean and one variance for every coordinate."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2:
        if np.any(arr != np.diag(np.diag(arr))):
            raise ValueError(f"{name}: a product target needs an isotropic start (a multiple of I)")
        arr = np.diag(arr)
    flat = arr.reshape(-1)
    if flat.size == 0 or np.any(flat != flat[0]):
        raise ValueError(f"{name}: a product target needs the same start on every coordinate; got {flat[:4]}...")
    return float(flat[0])


def track_for(target, h: float, init_mean=None, init_cov=None):
    """The exact tracker of a target: GaussianTrack (closed form) or GridTrack (density grid)."""
    if isinstance(target, GaussianTarget):
        return GaussianTrack(target, h, init_mean, init_cov)
    if isinstance(target, ProductTarget):
        return grid_track(target, h, init_mean, init_cov)
    raise ValueError(
        f"no exact KL for a {getattr(target, 'kind', type(target).__name__)} target; "
        "user potentials get the k-NN estimate from particles (gradlens.langevin.knn)"
    )
