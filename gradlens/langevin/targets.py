"""Targets p* ∝ exp(-U) for ULA: Gaussian, product of 1-D potentials, user potential.

Every target has ``dim``, ``m`` (strong convexity, 0 if none), ``L`` (smoothness,
None if unknown), ``kind`` and ``potential_and_grad(x)`` for a batch ``x`` of shape
(N, dim), returning ``U`` (N,) and ``grad U`` (N, dim). All arithmetic is float64.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# Relative tolerance for "symmetric" and for "m, L bound the spectrum".
_SYM_TOL = 1e-10


def check_step_size(h: float, L: float | None) -> None:
    """ULA with h >= 2/L diverges on the stiffest direction; refuse it, naming the limit."""
    if not (isinstance(h, (int, float, np.floating)) and math.isfinite(h) and h > 0):
        raise ValueError(f"step size h must be a positive finite number, got {h!r}")
    if L is not None and L > 0 and h >= 2.0 / L:
        raise ValueError(
            f"step size h={h:g} is at or above the stability limit 2/L = {2.0 / L:g} (L = {L:g}); "
            f"ULA diverges there: use h < {2.0 / L:g}"
        )


def load_array(path: str | os.PathLike, what: str) -> np.ndarray:
    """Read a .npy (never pickled) or whitespace/comma separated .txt/.csv array as float64."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: {what} file not found")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            text = path.read_text(encoding="utf-8")
            delimiter = "," if "," in text else None
            arr = np.loadtxt(path, delimiter=delimiter, dtype=np.float64, ndmin=1)
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read {what}: {exc}") from None
    if np.iscomplexobj(arr):
        raise ValueError(f"{path}: {what} has complex entries; a real-valued array is needed")
    try:
        arr = np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {what} is not numeric ({arr.dtype} entries: {exc})") from None
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise ValueError(f"{path}: {what} has a non-finite entry at index {bad}")
    return arr


# ---------------------------------------------------------------------------
# Gaussian


class GaussianTarget:
    """p* = N(mean, cov). Stored through Σ's eigen-decomposition Σ = Q diag(1/a) Q^T.

    ``a`` are the eigenvalues of the precision Σ^{-1} = ∇²U, so m = min a and
    L = max a unless looser valid bounds are supplied (m <= min a, L >= max a).
    """

    kind = "gaussian"

    def __init__(self, mean, cov, *, m: float | None = None, L: float | None = None, source: str = "arrays"):
        mean = np.asarray(mean, dtype=np.float64)
        cov = np.asarray(cov, dtype=np.float64)
        where = f"{source}: " if source != "arrays" else ""
        if mean.ndim != 1:
            raise ValueError(f"{where}mean must be a 1-D array, got shape {mean.shape}")
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ValueError(f"{where}covariance must have shape ({d}, {d}) to match the mean, got {cov.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
            raise ValueError(f"{where}mean and covariance must be finite")
        scale = float(np.max(np.abs(cov))) if d else 1.0
        asym = float(np.max(np.abs(cov - cov.T))) if d else 0.0
        if asym > _SYM_TOL * scale:
            raise ValueError(
                f"{where}covariance is not symmetric positive definite: it is not symmetric "
                f"(max |C - C^T| = {asym:.3g})"
            )
        cov = 0.5 * (cov + cov.T)
        lam, Q = np.linalg.eigh(cov)
        if lam[0] <= d * np.finfo(np.float64).eps * max(scale, 1e-300):
            raise ValueError(
                f"{where}covariance is not symmetric positive definite: smallest eigenvalue {lam[0]:.3g} <= 0 "
                "(numerically)"
            )
        self._init(mean, 1.0 / lam, Q, m, L)
        self.source = source

    @classmethod
    def random(cls, dim: int, cond: float = 10.0, seed: int = 0, *, m: float = 1.0, mean=None) -> "GaussianTarget":
        """Precision eigenvalues log-spaced between m and L = m*cond; a random rotation from ``seed``.

        With dim = 1 the single eigenvalue is L, so the default start N(0, 1/m) still
        differs from the target by the condition number. m and L are the nominal
        bounds of the family, used by the theory. The rotation is built lazily:
        exact KL from the default start never needs it.
        """
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not (cond >= 1 and math.isfinite(cond)):
            raise ValueError(f"cond must be a finite number >= 1, got {cond!r}")
        if not (m > 0 and math.isfinite(m)):
            raise ValueError(f"m must be a positive finite number, got {m!r}")
        dim = int(dim)
        L = m * cond
        a = np.array([L]) if dim == 1 else np.geomspace(m, L, dim)
        mean = np.zeros(dim) if mean is None else np.asarray(mean, dtype=np.float64)
        self = cls.__new__(cls)
        self._init(mean, a, None, m, L)
        self._rotation_seed = seed
        self.source = f"random(dim={dim}, cond={cond:g}, seed={seed}, m={m:g})"
        return self

    @classmethod
    def from_files(cls, mean_path=None, cov_path=None, *, m=None, L=None) -> "GaussianTarget":
        if cov_path is None:
            raise ValueError("a Gaussian from files needs --cov FILE (and optionally --mean FILE)")
        cov = load_array(cov_path, "covariance")
        if cov.ndim != 2:
            raise ValueError(f"{cov_path}: covariance must be a 2-D (d, d) array, got shape {cov.shape}")
        mean = np.zeros(cov.shape[0]) if mean_path is None else load_array(mean_path, "mean").reshape(-1)
        return cls(mean, cov, m=m, L=L, source=str(cov_path))

    def _init(self, mean, a, Q, m, L) -> None:
        self.mean = mean
        self.a = np.asarray(a, dtype=np.float64)  # precision eigenvalues (order of Q columns)
        self._Q = Q
        self._rotation_seed = None
        self._precision = None
        self.dim = mean.shape[0]
        if self.a.shape != (self.dim,):
            raise ValueError(f"{self.dim} means but {self.a.shape[0]} eigenvalues")
        a_min, a_max = float(self.a.min()), float(self.a.max())
        if m is not None and m > a_min * (1 + _SYM_TOL):
            raise ValueError(f"m={m:g} exceeds the smallest precision eigenvalue {a_min:g}; m must bound it from below")
        if L is not None and L < a_max * (1 - _SYM_TOL):
            raise ValueError(f"L={L:g} is below the largest precision eigenvalue {a_max:g}; L must bound it from above")
        self.m = float(a_min if m is None else m)
        self.L = float(a_max if L is None else L)

    @property
    def Q(self) -> np.ndarray:
        """Eigenvectors of Σ (columns), matching ``a``."""
        if self._Q is None:
            if self._rotation_seed is None:
                self._Q = np.eye(self.dim)
            else:
                rng = np.random.default_rng(self._rotation_seed)
                Q, R = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
                self._Q = Q * np.sign(np.diag(R))  # Haar-distributed rotation
        return self._Q

    @property
    def cov(self) -> np.ndarray:
        return (self.Q / self.a) @ self.Q.T

    @property
    def precision(self) -> np.ndarray:
        if self._precision is None:
            self._precision = (self.Q * self.a) @ self.Q.T
        return self._precision

    @property
    def is_diagonal(self) -> bool:
        return self._Q is None and self._rotation_seed is None

    def eigenbasis(self) -> "GaussianTarget":
        """The same target in Σ's eigenbasis centred at its mean: N(0, diag(1/a)).

        ULA commutes with rotations and translations, so running particles here is an
        exact change of variables that costs O(N d) per step instead of O(N d^2).
        """
        other = GaussianTarget.__new__(GaussianTarget)
        other._init(np.zeros(self.dim), self.a, None, self.m, self.L)
        other.source = f"eigenbasis of {self.source}"
        return other

    def to_eigenbasis(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.Q

    def potential_and_grad(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        diff = np.asarray(x, dtype=np.float64) - self.mean
        grad = diff * self.a if self.is_diagonal else diff @ self.precision
        return 0.5 * np.einsum("ij,ij->i", diff, grad), grad

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal((n, self.dim)) / np.sqrt(self.a)
        return self.mean + (z if self.is_diagonal else z @ self.Q.T)

    def describe(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "m": self.m, "L": self.L, "source": self.source,
                "cond": self.L / self.m}


# ---------------------------------------------------------------------------
# Product of identical 1-D potentials


def _log_cosh(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return ax + np.log1p(np.exp(-2.0 * ax)) - math.log(2.0)


@dataclass(frozen=True)
class Potential1D:
    """φ with φ'' in [m, L] and its minimiser at 0 (all built-ins are even)."""

    name: str
    phi: Callable[[np.ndarray], np.ndarray]
    dphi: Callable[[np.ndarray], np.ndarray]
    m: float
    L: float
    formula: str


POTENTIALS_1D: dict[str, Potential1D] = {
    "strongly_convex": Potential1D(
        "strongly_convex", lambda x: 0.5 * x * x + _log_cosh(x), lambda x: x + np.tanh(x), 1.0, 2.0,
        "x^2/2 + log cosh x",
    ),
    "weakly_convex": Potential1D("weakly_convex", _log_cosh, np.tanh, 0.0, 1.0, "log cosh x"),
    # φ = x²/2 makes the product target N(0, I): the check that the grid is exact.
    "quadratic": Potential1D("quadratic", lambda x: 0.5 * x * x, lambda x: np.asarray(x, dtype=np.float64), 1.0, 1.0,
                             "x^2/2"),
}


class ProductTarget:
    """U(x) = Σ_j φ(x_j): ULA runs independently on each coordinate, so KL_d = d · KL_1."""

    kind = "product"

    def __init__(self, phi: str | Potential1D, dim: int):
        if isinstance(phi, str):
            if phi not in POTENTIALS_1D:
                raise ValueError(f"unknown 1-D potential {phi!r}; built-ins: {sorted(POTENTIALS_1D)}")
            phi = POTENTIALS_1D[phi]
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.phi = phi
        self.dim = int(dim)
        self.m = phi.m
        self.L = phi.L

    def potential_and_grad(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        return self.phi.phi(x).sum(axis=1), self.phi.dphi(x)

    def describe(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "m": self.m, "L": self.L, "phi": self.phi.name,
                "formula": self.phi.formula}


# ---------------------------------------------------------------------------
# User potential `module:function`


# User code may also raise SystemExit (sys.exit) or KeyboardInterrupt itself: reported like
# any other error (a Ctrl-C during the call stops the run the same way, with a message).
_USER_CODE_ERRORS = (Exception, KeyboardInterrupt, SystemExit)


def load_potential(spec: str) -> Callable:
    """Import ``module:function`` (or ``path/to/file.py:function``).

    The current directory is searched too, so a local ``mypot.py`` works from the CLI.
    """
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise ValueError(f"potential {spec!r} must look like 'module:function' or 'path/file.py:function'")
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise ValueError(f"potential {spec!r} must look like 'module:function' or 'path/file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ImportError(f"no such file {path}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            cwd = os.getcwd()
            added = cwd not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(cwd)
    except _USER_CODE_ERRORS as exc:  # any failure while importing user code is the user's input error
        raise ValueError(
            f"potential {spec!r}: cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    func = getattr(module, func_name, None)
    if func is None:
        raise ValueError(f"potential {spec!r}: module {module_name!r} has no attribute {func_name!r}")
    if not callable(func):
        raise ValueError(f"potential {spec!r}: {func_name!r} is not callable")
    return func


class UserTarget:
    """p* ∝ exp(-U) for a user function ``f(x) -> (U, grad U)`` on a batch x of shape (N, d).

    Its KL can only be estimated (k-NN on particles); m and L are whatever the user
    states (L enables the stability check, m the default start N(0, I/m)).
    """

    kind = "user"

    def __init__(self, spec: str | Callable, dim: int, *, m: float | None = None, L: float | None = None):
        if int(dim) != dim or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.spec = spec if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))
        self.func = load_potential(spec) if isinstance(spec, str) else spec
        self.dim = int(dim)
        self.m = 0.0 if m is None else float(m)
        self.L = None if L is None else float(L)

    def potential_and_grad(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        try:
            out = self.func(x)
            U, grad = out
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"potential {self.spec}: must return (U, grad U) for a batch; calling it failed: {exc}"
            ) from exc
        except _USER_CODE_ERRORS as exc:  # whatever the user's code raises is a problem with the input
            raise ValueError(f"potential {self.spec}: raised {type(exc).__name__}{f': {exc}' if str(exc) else ''}") from exc
        U = np.asarray(U, dtype=np.float64).reshape(-1)
        grad = np.asarray(grad, dtype=np.float64)
        n = x.shape[0]
        if U.shape != (n,) or grad.shape != x.shape:
            raise ValueError(
                f"potential {self.spec}: for x of shape {x.shape} it must return U of shape ({n},) and grad U of "
                f"shape {x.shape}; got {U.shape} and {grad.shape}"
            )
        bad = ~(np.isfinite(U) & np.all(np.isfinite(grad), axis=1))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"potential {self.spec} returned non-finite U or grad U for {int(bad.sum())} of {n} points "
                f"(first at row {i}: x = {np.array2string(x[i], precision=4, threshold=6)}, U = {float(U[i])!r})"
            )
        return U, grad

    def describe(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "m": self.m, "L": self.L, "potential": self.spec}


def default_start(target) -> tuple[np.ndarray, float]:
    """Theorem 1's start N(0, I/m); N(0, I) when there is no strong convexity (m = 0)."""
    m = float(getattr(target, "m", 0.0) or 0.0)
    return np.zeros(target.dim), (1.0 / m if m > 0 else 1.0)
