"""One Langevin run, or a sweep over (d, eps), written as a gradlens run directory.

A run directory of kind "langevin" holds config.json (``config.mode`` = "run" or
"sweep"), steps.csv, TensorBoard events and summary.json (column names: ``gradlens/runs/langevin_schema.py``).

* mode "run": one row of steps.csv per logged iteration k. Every iteration is
  logged when there are at most ``max_rows``; otherwise a log-spaced plus evenly
  spaced subset (always with 0 and the last step). ``kl_decrement`` is exact at
  every logged row (KL at k+1 is computed too), so the dissipation check needs no
  consecutive rows.
* mode "sweep": one row of steps.csv per (d, eps) cell, ``step`` = cell index.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..runs import RunWriter, prepare_run_dir
from ..numerics import loglog_slope
from ..runs import schema
from ..runs import langevin_schema as C
from .exact import track_for
from .knn import METHOD as KNN_METHOD
from .knn import knn_kl
from .sampler import ULASampler, gaussian_particles, mala_samples
from .targets import GaussianTarget, ProductTarget, UserTarget, check_step_size, default_start, load_array
from .theory import (
    best_h_for_eps,
    contraction_bound,
    theorem1,
    theorem2_for,
    vempala_wibisono,
    vempala_wibisono_bound,
)

PARTICLE_BUDGET = 2e9   # steps x particles x dim above which "auto" particles become 0
KNN_POINTS = 50         # k-NN evaluations per run by default (they cost O(N^2 d) each)


@dataclass
class RunSpec:
    target: str = "gaussian"             # gaussian | product | user
    dim: int = 10
    cond: float = 10.0
    m: float | None = None
    L: float | None = None
    mean_file: str | None = None
    cov_file: str | None = None
    seed: int = 0
    phi: str = "strongly_convex"
    potential: str | None = None
    step: float | None = None
    eps: float | None = None
    steps: int | None = None
    particles: int = -1                  # -1: automatic
    init_mean: str | float | None = None
    init_cov: str | float | None = None
    knn_every: int | None = None         # None: automatic (user targets only)
    knn_k: int = 5
    reference_steps: int = 1000
    max_rows: int = 5000
    grid_check: bool = True
    label: str | None = None


@dataclass
class SweepSpec:
    dims: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    eps: list[float] = field(default_factory=lambda: [0.1, 0.03, 0.01])
    target: str = "gaussian"
    cond: float = 10.0
    m: float = 1.0
    seed: int = 0
    phi: str = "strongly_convex"
    best_h: bool = True
    max_work: float = 3e9                # product target: grid steps x kernel entries per cell (~1 ns each)
    label: str | None = None


# ---------------------------------------------------------------- building blocks


def build_target(spec: RunSpec):
    if spec.target == "gaussian":
        if spec.cov_file or spec.mean_file:
            return GaussianTarget.from_files(spec.mean_file, spec.cov_file, m=spec.m, L=spec.L)
        return GaussianTarget.random(spec.dim, spec.cond, spec.seed, m=1.0 if spec.m is None else spec.m)
    if spec.target == "product":
        return ProductTarget(spec.phi, spec.dim)
    if spec.target == "user":
        if not spec.potential:
            raise ValueError("--target user needs --potential MODULE:FUNCTION")
        return UserTarget(spec.potential, spec.dim, m=spec.m, L=spec.L)
    raise ValueError(f"unknown target {spec.target!r}; choose gaussian, product or user")


def _start_value(value, what: str):
    """A start given on the command line: a number, or a .npy/.txt file."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return load_array(value, what)


def log_steps(steps: int, max_rows: int) -> np.ndarray:
    """Every step if they fit in max_rows; else half log-spaced, half evenly spaced."""
    if steps + 1 <= max_rows:
        return np.arange(steps + 1)
    half = max(2, max_rows // 2)
    ks = np.concatenate([[0, steps], np.geomspace(1, steps, half), np.linspace(0, steps, half)])
    return np.unique(np.rint(ks).astype(np.int64))


def _theory(target, eps: float | None, init_mean, init_cov) -> dict:
    """Theorem 1 (strongly convex) or Theorem 2 (convex) for this target, when eps is given."""
    if eps is None:
        return {}
    m, L = target.m, target.L
    if L is None:
        return {"note": "no theory: the target's L is unknown (pass --L)"}
    if m and m > 0:
        h, k = theorem1(target.dim, eps, m, L)
        return {"theorem": "theorem1", "h": h, "k": k}
    if target.kind in ("gaussian", "product"):  # exact targets: Theorem 2's C1, C2 are computable
        t2 = theorem2_for(target, eps, init_mean=init_mean, init_cov=init_cov)
        return {"theorem": "theorem2", "h": t2.h, "k": t2.k, "C1": t2.C1, "C2": t2.C2, "h0": t2.h0}
    return {"note": "no theory: a user potential without --m needs Theorem 2's C1, C2 (not computed)"}


def _step_and_steps(spec: RunSpec, theory: dict) -> tuple[float, int]:
    """--step wins; otherwise the theorem's h. Steps: --steps, else the theorem's k with --eps alone, else 1000."""
    if spec.step is not None:
        h = float(spec.step)
    elif "h" in theory:
        h = theory["h"]
    elif spec.eps is not None:
        raise ValueError(f"--eps cannot choose a step size here ({theory.get('note', '')}); pass --step H")
    else:
        raise ValueError("pass --step H (the ULA step size) or --eps EPS (Theorem 1 then chooses h and the steps)")
    steps = spec.steps if spec.steps is not None else (theory["k"] if spec.step is None and "k" in theory else 1000)
    if steps < 0:
        raise ValueError(f"--steps must be >= 0, got {steps}")
    return h, int(steps)


def _label(spec: RunSpec, target, h: float) -> str:
    if spec.label:
        return spec.label
    what = {"gaussian": f"gaussian cond={target.L / target.m:g}" if target.m else "gaussian",
            "product": f"product {spec.phi}", "user": f"user {spec.potential}"}[spec.target]
    return f"{what} d={target.dim} h={h:.3g}"


def _tensorboard(path: Path, layout, enabled: bool):
    if not enabled:
        return None
    from ..runs.tensorboard import TensorBoardLogger

    return TensorBoardLogger(path, layout=layout)


# ---------------------------------------------------------------- one run


def run_langevin(spec: RunSpec, out: str | Path, *, overwrite: bool = False, tensorboard: bool = True,
                 echo: Callable[[str], None] = print) -> dict:
    """Run ULA on the target, track KL exactly (or estimate it), write the run directory."""
    started = time.perf_counter()
    target = build_target(spec)
    init_mean = _start_value(spec.init_mean, "init mean")
    init_cov = _start_value(spec.init_cov, "init covariance")
    theory = _theory(target, spec.eps, init_mean, init_cov)
    h, steps = _step_and_steps(spec, theory)
    exact = target.kind in ("gaussian", "product")
    track = track_for(target, h, init_mean, init_cov) if exact else None
    if not exact:
        check_step_size(h, target.L)
    particles = spec.particles
    if particles < 0:
        particles = 1000 if (not exact or steps * 1000.0 * target.dim <= PARTICLE_BUDGET) else 0
    knn_every = spec.knn_every
    if knn_every is None:
        knn_every = max(1, steps // KNN_POINTS) if not exact else 0
    if not exact and particles < 2:
        raise ValueError("a user potential has no exact KL: it needs --particles >= 2 for the k-NN estimate")

    sampler, reference, knn_info = None, None, {}
    if particles > 0:  # before the run directory exists: a bad user potential fails here, leaving nothing
        sampler, reference, knn_info = _particles(target, track, h, particles, spec, init_mean, init_cov, knn_every)
    ks = log_steps(steps, spec.max_rows)
    label = _label(spec, target, h)
    config = {
        "mode": C.MODE_RUN, "target": target.kind, "label": label, "h": h, "steps": steps, "eps": spec.eps,
        "particles": particles, "seed": spec.seed, "dim": target.dim, "m": target.m, "L": target.L,
        "target_detail": target.describe(), "spec": asdict(spec),
        "exact": {"gaussian": "closed form", "product": "density grid"}.get(target.kind, "none: k-NN estimate only"),
    }
    path = prepare_run_dir(out, overwrite=overwrite)
    writer = RunWriter(path, config, kind=schema.KIND_LANGEVIN)
    tb = _tensorboard(path, C.LANGEVIN_LAYOUT, tensorboard)
    echo(f"gradlens langevin: {label}, {steps} steps, {particles} particles -> {path}")

    summary: dict = {"mode": C.MODE_RUN, "target": target.describe(), "h": h, "steps": steps, "particles": particles,
                     "label": label}
    exact_rows: dict[str, np.ndarray] = {}
    if exact:
        exact_rows, mass = _exact_rows(track, ks, h)
        summary.update(_exact_summary(ExactRun(spec, target, track, h, ks, exact_rows, mass, theory)))
    elif theory:
        summary["theory"] = dict(theory)
    kl0 = float(exact_rows[C.KL][0]) if exact else math.nan
    columns = {**exact_rows, **_bounds(target, h, ks, kl0)}
    try:
        estimates = _write_rows(writer, tb, ks, columns, sampler, reference, knn_every, spec.knn_k)
        if sampler is not None:
            summary["grad_u_norm_final"] = sampler.grad_norm_mean
        if estimates:
            summary["kl_estimate"] = {"final": estimates[-1], **knn_info,
                                      "note": "an ESTIMATE from particles; the interval is bootstrap noise only"}
        summary["elapsed_s"] = time.perf_counter() - started
        writer.write_summary(summary)
    finally:
        writer.close()
        if tb is not None:
            tb.close()
    _echo_summary(summary, echo)
    return summary


def _write_rows(writer, tb, ks, columns, sampler, reference, knn_every, knn_k) -> list[dict]:
    """Step the particles (if any) through every iteration and log the rows at ``ks``."""
    estimates: list[dict] = []
    row_index = {int(k): i for i, k in enumerate(ks)}
    last = int(ks[-1])
    for k in range(last + 1) if sampler is not None else ks.tolist():
        if k in row_index:
            i = row_index[k]
            row = {C.STEP: k, **{col: float(values[i]) for col, values in columns.items()}}
            if sampler is not None:
                row[C.GRAD_U_NORM] = sampler.grad_norm_mean
                if knn_every and (k % knn_every == 0 or k == last):
                    est = knn_kl(sampler.x, reference, k=knn_k, seed=k)
                    row.update({C.KL_ESTIMATE: est.value, C.KL_ESTIMATE_LO: est.lo, C.KL_ESTIMATE_HI: est.hi})
                    estimates.append({"step": k, "value": est.value, "lo": est.lo, "hi": est.hi})
            writer.log_step({c: row.get(c) for c in C.STEP_COLUMNS})
            if tb is not None:
                tb.scalars(k, {c: v for c, v in row.items() if v is not None and np.isfinite(v)})
        if sampler is not None and k < last:
            sampler.step()
    return estimates


def _exact_rows(track, ks: np.ndarray, h: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    metrics = track.metrics(ks)
    kl_next = track.kl(ks + 1)  # KL only: a second pass is cheaper than W2 and Fisher at k+1
    rows = {
        C.KL: metrics["kl"],
        C.KL_DECREMENT: metrics["kl"] - kl_next,
        C.FISHER: metrics["fisher"],
        C.W2: metrics["w2"],
    }
    rows[C.H_FISHER] = h * rows[C.FISHER]
    rows[C.KL_STATIONARY] = np.full(len(ks), track.kl_stationary)
    mass = metrics.get("mass", np.ones(1))
    return rows, mass


def _bounds(target, h: float, ks: np.ndarray, kl0: float) -> dict[str, np.ndarray]:
    m, L = target.m, target.L
    if not (m and m > 0 and L) or not math.isfinite(kl0):
        return {}
    # e^{-mhk}KL_0 + 8hdL²/m is Vempala-Wibisono's bound with α = m; it is a bound only for
    # h <= m/(4L²), so both columns are NaN above that (Cheng-Bartlett's Theorem 1 itself is the
    # point (k, ε) at its own h, in the summary, not a curve).
    vw = vempala_wibisono_bound(ks, h, target.dim, m, L, kl0)
    return {C.BOUND_THEOREM1: vw, C.BOUND_CONTRACTION: contraction_bound(ks, h, m, kl0), C.BOUND_VW: vw}


@dataclass(frozen=True)
class ExactRun:
    """What a run with an exact KL knows once its rows are computed: passed whole to the summary helpers."""

    spec: RunSpec
    target: object
    track: object            # GaussianTrack or GridTrack: each knows how its KL is computed
    h: float
    ks: np.ndarray
    rows: dict
    mass: np.ndarray
    theory: dict

    @property
    def kl(self) -> np.ndarray:
        return self.rows[C.KL]

    def kl_at(self, k: int) -> float:
        """KL after k steps: a logged row, or the closed form when the track has one; NaN otherwise."""
        logged = np.flatnonzero(self.ks == k)
        if logged.size:
            return float(self.kl[logged[0]])
        return float(self.track.kl([k])[0]) if self.track.kl_at_any_k else math.nan

    def first_k_below(self, eps: float) -> int | None:
        """First k with exact KL <= eps within the run (a closed-form track: at any k)."""
        if self.track.kl_at_any_k:
            return self.track.first_k_below(eps)
        if len(self.ks) == int(self.ks[-1]) + 1:  # every step is logged
            hits = np.flatnonzero(self.kl <= eps)
            return int(self.ks[hits[0]]) if hits.size else None
        return self.track.first_k_below(eps, max_steps=int(self.ks[-1]))


def _exact_summary(run: ExactRun) -> dict:
    kl, track, eps = run.kl, run.track, run.spec.eps
    out = {"exact": track.method, "kl0": float(kl[0]), "kl_final": float(kl[-1]), "kl_stationary": float(track.kl_stationary),
           "fisher_final": float(run.rows[C.FISHER][-1]), "w2_final": float(run.rows[C.W2][-1])}
    out.update(track.facts(run.ks, kl, run.mass, grid_check=run.spec.grid_check))
    if eps is not None:
        out.update({"eps": eps, "measured_k": run.first_k_below(eps)})
    if run.theory:
        out["theory"] = dict(run.theory)
    if eps is not None and run.theory.get("theorem") == "theorem1":
        section = _theorem1_section(run, out["measured_k"])
        if section:
            out["theorem1"] = section
        vw = vempala_wibisono(run.target.dim, eps, run.target.m, run.target.L, float(kl[0]))
        out["vempala_wibisono"] = {"h": vw.h, "k": vw.k, "alpha": run.target.m}
    return out


def _theorem1_section(run: ExactRun, measured: int | None) -> dict | None:
    """KL at Theorem 1's (h, k) and the looseness k_theory / k_measured, both at Theorem 1's h.

    Available when this run uses Theorem 1's h, or when the track can be re-made at
    Theorem 1's h with a closed form (a Gaussian from a commuting start); else None.
    """
    eps, th_h, th_k = run.spec.eps, run.theory["h"], run.theory["k"]
    if math.isclose(th_h, run.h, rel_tol=1e-12):
        kl_at, measured_th = run.kl_at(th_k), measured
    else:
        other = run.track.with_step(th_h)
        if other is None:
            return None
        kl_at, measured_th = float(other.kl([th_k])[0]), other.first_k_below(eps)
    return {
        "h": th_h, "k": th_k, "kl_at_k": kl_at,
        "bound_holds": bool(kl_at <= eps) if math.isfinite(kl_at) else None,
        "measured_k": measured_th,
        "looseness_factor": th_k / measured_th if measured_th else (math.inf if measured_th == 0 else None),
        "looseness_note": "theory k / measured k, both at Theorem 1's h; inf when the start already has KL <= eps",
    }


def _particles(target, track, h, n, spec: RunSpec, init_mean, init_cov, knn_every):
    """ULA particles (Gaussian: in Σ's eigenbasis, an exact change of variables) and a p* reference."""
    rng = np.random.default_rng(spec.seed)
    info: dict = {}
    if isinstance(target, GaussianTarget):
        frame = target.eigenbasis()
        mean0 = track.nu0
        cov0 = (1.0 + track.t0) / track.a if track.commuting else None
        if cov0 is None:
            ia = 1.0 / np.sqrt(track.a)
            cov0 = ia[:, None] * (np.eye(target.dim) + track.T0) * ia[None, :]
        x0 = gaussian_particles(n, mean0, cov0, rng)
        fn, L = frame.potential_and_grad, target.L
        reference = frame.sample(n, np.random.default_rng(spec.seed + 1)) if knn_every else None
        info["reference"] = "exact draws from p*"
    else:
        mean_default, var_default = default_start(target)
        mean0 = mean_default if init_mean is None else np.broadcast_to(np.asarray(init_mean, float), (target.dim,))
        cov0 = var_default if init_cov is None else np.asarray(init_cov, float)
        x0 = gaussian_particles(n, np.asarray(mean0, float), cov0, rng)
        fn, L = target.potential_and_grad, target.L
        reference = None
        if knn_every:
            start = gaussian_particles(n, np.zeros(target.dim), 1.0, np.random.default_rng(spec.seed + 1))
            try:
                reference, mala = mala_samples(fn, start, spec.reference_steps, seed=spec.seed + 2,
                                               h=min(0.1, 0.5 / L) if L else 0.1)
            except ValueError as exc:
                raise ValueError(f"MALA reference sample of p*: {exc}") from None
            info["reference"] = f"MALA draws from p* ({mala['steps']} steps, h={mala['h']:.3g}, " \
                                f"acceptance {mala['acceptance']:.2f})"
    if knn_every:
        info["method"] = KNN_METHOD
        info["every"] = knn_every
        info["k"] = spec.knn_k
    return ULASampler(fn, h, x0, seed=spec.seed + 3, L=L), reference, info


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _echo_summary(summary: dict, echo: Callable[[str], None]) -> None:
    parts = []
    for key in ("kl0", "kl_final", "kl_stationary"):
        if key in summary:
            parts.append(f"{key}={summary[key]:.4g}")
    th = summary.get("theorem1")
    if th:
        parts.append(f"Theorem 1: k={th['k']}, KL(k)={_fmt(th['kl_at_k'])}, measured k={th['measured_k']}, "
                     f"looseness={_fmt(th['looseness_factor'])}")
    if "kl_estimate" in summary:
        e = summary["kl_estimate"]["final"]
        parts.append(f"k-NN KL estimate (final) = {e['value']:.3g} [{e['lo']:.3g}, {e['hi']:.3g}]")
    if "grid" in summary and "error_estimate" in summary["grid"]:
        parts.append(f"grid error <= {summary['grid']['error_estimate']:.2g}")
    echo("  " + "; ".join(parts))


# ---------------------------------------------------------------- sweep


def _sweep_cell(target, d: int, eps: float, spec: SweepSpec) -> dict:
    """Theorem 1's (h, k), the exact KL after k steps and the exact first k at that h; the best h."""
    h, k = theorem1(d, eps, target.m, target.L)
    row = {C.DIM: d, C.EPS: eps, C.H_THEORY: h, C.K_THEORY: k}
    track = track_for(target, h)
    kl_limit, search_limit = track.sweep_limits(spec.max_work, k)  # what this cell may afford
    kl0 = float(track.kl([0])[0])
    kl_k = float(track.kl([k])[0]) if k <= kl_limit else math.nan
    measured = track.first_k_below(eps, max_steps=search_limit)
    row.update({C.KL0: kl0, C.KL_AT_K_THEORY: kl_k,
                C.BOUND_HOLDS: (int(kl_k <= eps) if math.isfinite(kl_k) else None),
                C.K_MEASURED: measured,
                C.LOOSENESS: (k / measured) if measured else (math.inf if measured == 0 else None)})
    if spec.best_h:
        try:
            h_best, k_best = best_h_for_eps(target, eps, **track.BEST_H_SEARCH)
        except ValueError:
            return row
        row.update({C.H_BEST: h_best, C.K_BEST: k_best})
        stationary = track.stationary_kl_at(h_best)
        if stationary is not None:
            row[C.KL_STATIONARY_BEST] = stationary
    return row


def _sweep_constants(spec: SweepSpec) -> tuple[float, float]:
    """Check the sweep's spec; return the targets' (m, L)."""
    if not spec.dims or not spec.eps:
        raise ValueError("a sweep needs at least one dimension (--dims) and one eps (--eps)")
    for eps in spec.eps:
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"--eps values must be positive, got {eps!r}")
    if spec.target not in ("gaussian", "product"):
        raise ValueError(f"a sweep needs an exact target (gaussian or product), got {spec.target!r}")
    if spec.target == "gaussian":
        return spec.m, spec.m * spec.cond
    phi = ProductTarget(spec.phi, 1).phi  # validates the name
    if not phi.m > 0:
        raise ValueError(f"the sweep uses Theorem 1, which needs a strongly convex potential; {spec.phi!r} is not")
    return phi.m, phi.L


def _sweep_target(spec: SweepSpec, d: int):
    if spec.target == "gaussian":
        return GaussianTarget.random(d, spec.cond, spec.seed, m=spec.m)
    return ProductTarget(spec.phi, d)


def _log_cell(writer, tb, row: dict, echo: Callable[[str], None]) -> None:
    """One steps.csv row, its TensorBoard scalars (x = d) and a progress line."""
    writer.log_step({c: row.get(c) for c in [C.STEP] + C.SWEEP_COLUMNS})
    if tb is not None:
        values = {key: row.get(key) for key in (C.K_THEORY, C.K_MEASURED, C.K_BEST, C.LOOSENESS)}
        tb.scalars(row[C.DIM], {f"sweep/{key}/eps={row[C.EPS]:g}": v for key, v in values.items() if v is not None and math.isfinite(v)})
    echo(f"  d={row[C.DIM]:<5} eps={row[C.EPS]:<6g} theory k={row[C.K_THEORY]:<12} measured k={row[C.K_MEASURED]} "
         f"(looseness {_fmt(row[C.LOOSENESS])})  oracle best h={_fmt(row.get(C.H_BEST))} -> "
         f"k={row.get(C.K_BEST)}  KL(k_theory)={_fmt(row[C.KL_AT_K_THEORY])}")


def run_sweep(spec: SweepSpec, out: str | Path, *, overwrite: bool = False, tensorboard: bool = True,
              echo: Callable[[str], None] = print) -> dict:
    """Iterations to reach each eps in each d: Theorem 1's k, the exact k at Theorem 1's h, and at the oracle best h."""
    started = time.perf_counter()
    m, L = _sweep_constants(spec)
    default = f"sweep gaussian cond={spec.cond:g}" if spec.target == "gaussian" else f"sweep product {spec.phi}"
    label = spec.label or default
    config = {"mode": C.MODE_SWEEP, "target": spec.target, "label": label, "m": m, "L": L, "spec": asdict(spec),
              "table": "steps.csv: one row per (d, eps) cell; step = cell index"}
    path = prepare_run_dir(out, overwrite=overwrite)
    writer = RunWriter(path, config, kind=schema.KIND_LANGEVIN)
    tb = _tensorboard(path, C.SWEEP_LAYOUT, tensorboard)
    echo(f"gradlens langevin sweep: d in {spec.dims}, eps in {spec.eps} ({label}) -> {path}")
    rows = []
    try:
        cells = ((d, eps, target) for d in spec.dims for target in [_sweep_target(spec, d)] for eps in spec.eps)
        for d, eps, target in cells:
            row = {**_sweep_cell(target, d, eps, spec), C.STEP: len(rows)}
            rows.append(row)
            _log_cell(writer, tb, row, echo)
        summary = {"mode": C.MODE_SWEEP, "label": label, "cells": len(rows), **_sweep_slopes(rows),
                   "note": ("k_measured, kl_at_k_theory: exact. Product cells whose grid work would pass "
                            "max_work are left empty (n/a), not failed." if spec.target == "product" else
                            "all values exact (closed form)"),
                   "all_bounds_hold": all(r[C.BOUND_HOLDS] == 1 for r in rows if r[C.BOUND_HOLDS] is not None),
                   "elapsed_s": time.perf_counter() - started}
        writer.write_summary(summary)
    finally:
        writer.close()
        if tb is not None:
            tb.close()
    for axis, name in (("slope_d", "d"), ("slope_inv_eps", "1/eps")):
        text = ", ".join(f"{key} {_mean_slope(summary[axis][key]):.3g}" for key in (C.K_THEORY, C.K_MEASURED, C.K_BEST))
        echo(f"  mean fitted slope of log k vs log {name}: {text}")
    return summary


def _mean_slope(slopes: dict) -> float:
    values = [v for v in slopes.values() if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _sweep_slopes(rows: list[dict]) -> dict:
    """Fitted log-log slopes of iterations vs d (per eps) and vs 1/eps (per d)."""
    out = {"slope_d": {}, "slope_inv_eps": {}}
    for key in (C.K_THEORY, C.K_MEASURED, C.K_BEST):
        out["slope_d"][key] = {f"{e:g}": loglog_slope([r[C.DIM] for r in rows if r[C.EPS] == e],
                                                    [r.get(key) or math.nan for r in rows if r[C.EPS] == e])
                               for e in sorted({r[C.EPS] for r in rows})}
        out["slope_inv_eps"][key] = {str(d): loglog_slope([1.0 / r[C.EPS] for r in rows if r[C.DIM] == d],
                                                        [r.get(key) or math.nan for r in rows if r[C.DIM] == d])
                                     for d in sorted({r[C.DIM] for r in rows})}
    return out
