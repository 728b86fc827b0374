"""Langevin MCMC in KL (Cheng & Bartlett 2018): ULA's law tracked exactly where mathematics allows.

Gaussian targets: closed form in Σ's eigenbasis (any k in O(d) from a commuting start).
Product targets: the 1-D density propagated on a grid (KL_d = d · KL_1).
User potentials: particles and a k-NN estimate with a bootstrap interval.
"""

from .exact import exact_kl, track_for
from .exact_gaussian import GaussianTrack, stationary_cov, stationary_kl
from .grid import GridTrack
from .knn import KLEstimate, knn_kl
from .sampler import ULASampler, mala_samples
from .targets import (
    POTENTIALS_1D,
    GaussianTarget,
    Potential1D,
    ProductTarget,
    UserTarget,
    check_step_size,
    default_start,
    load_potential,
)
from .theory import (
    Theorem1,
    Theorem2,
    best_h_for_eps,
    contraction_bound,
    smallest_k_to_eps,
    theorem1,
    theorem1_bound,
    theorem2,
    theorem2_for,
    vempala_wibisono,
    vempala_wibisono_bound,
)

__all__ = [
    "GaussianTarget", "ProductTarget", "UserTarget", "Potential1D", "POTENTIALS_1D",
    "exact_kl", "track_for", "GaussianTrack", "GridTrack", "stationary_cov", "stationary_kl",
    "ULASampler", "mala_samples", "knn_kl", "KLEstimate",
    "theorem1", "theorem1_bound", "contraction_bound", "theorem2", "theorem2_for",
    "vempala_wibisono", "vempala_wibisono_bound", "smallest_k_to_eps", "best_h_for_eps",
    "Theorem1", "Theorem2", "check_step_size", "default_start", "load_potential",
]
