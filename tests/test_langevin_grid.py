"""Product-target density grid: exact against the Gaussian case, Theorem 1 on the strongly convex target."""

from __future__ import annotations

import numpy as np
import pytest

import gradlens.langevin as gl
from gradlens.langevin.exact_gaussian import GaussianTrack
from gradlens.langevin.grid import GridTrack, grid_error
from gradlens.langevin.runner import RunSpec, run_langevin


@pytest.mark.parametrize("h, mean0, var0", [(0.05, 0.5, 2.0), (0.3, -1.0, 0.3), (1.5, 0.2, 1.0), (2e-3, 1.0, 1.0)])
def test_grid_kl1_equals_gaussian_case_for_quadratic_phi(h, mean0, var0):
    # φ(x) = x²/2: the product target is N(0, I) and the exact law is Gaussian.
    ks = np.arange(0, 121)
    exact = GaussianTrack(gl.GaussianTarget(np.zeros(1), np.eye(1)), h, [mean0], [[var0]]).metrics(ks)
    track = GridTrack(gl.ProductTarget("quadratic", 1), h, mean0, var0)
    grid = track.metrics(ks)
    kl_err = np.abs(grid["kl"] - exact["kl"])
    assert np.all(kl_err <= 1e-6 * np.maximum(exact["kl"], 1.0))  # <= 1e-6 absolute and relative
    assert np.all(kl_err <= 1e-6 * exact["kl"] + 1e-12)
    assert np.allclose(grid["fisher"], exact["fisher"], rtol=1e-6, atol=1e-12)
    assert np.allclose(grid["w2"], exact["w2"], rtol=1e-8)
    assert np.all(np.abs(grid["mass"] - 1.0) < 1e-10)
    # The reported error estimate bounds the actual error.
    assert np.max(kl_err) <= grid_error(track, ks, grid["kl"]) + 1e-12
    assert track.kl_stationary == pytest.approx(gl.stationary_kl(gl.GaussianTarget(np.zeros(1), np.eye(1)), h),
                                                rel=1e-6)


def test_product_kl_is_d_times_one_dimensional():
    h = 0.02
    one = gl.exact_kl(gl.ProductTarget("strongly_convex", 1), h, 50)
    seven = gl.exact_kl(gl.ProductTarget("strongly_convex", 7), h, 50)
    assert np.allclose(seven, 7.0 * one, rtol=1e-13)
    # and d-dim quadratic product equals the d-dim isotropic Gaussian
    gauss = gl.exact_kl(gl.GaussianTarget(np.zeros(7), np.eye(7)), h, 50, init_cov=2.0)
    quad = gl.exact_kl(gl.ProductTarget("quadratic", 7), h, 50, init_cov=2.0)
    assert np.allclose(quad, gauss, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("d", [1, 10])
def test_theorem1_holds_on_strongly_convex_product(d):
    eps = 0.1
    target = gl.ProductTarget("strongly_convex", d)
    h, k = gl.theorem1(d, eps, target.m, target.L)
    assert (target.m, target.L) == (1.0, 2.0)
    track = gl.track_for(target, h)
    kl0, kl_k = track.kl([0, k])
    assert kl_k <= eps
    measured = track.first_k_below(eps, max_steps=k)
    assert measured is not None and measured <= k
    if d == 1:
        assert kl0 <= eps and measured == 0  # the start already satisfies the bound: looseness is infinite
    else:
        assert kl0 > eps and 0 < measured < k


def test_run_summary_reports_product_theorem1_looseness(tmp_path):
    spec = RunSpec(target="product", dim=10, eps=0.1, particles=0, max_rows=60, grid_check=False)
    summary = run_langevin(spec, tmp_path / "run", tensorboard=False, echo=lambda s: None)
    th = summary["theorem1"]
    assert th["bound_holds"] is True and th["kl_at_k"] <= 0.1
    assert th["k"] == gl.theorem1(10, 0.1, 1.0, 2.0).k
    assert th["looseness_factor"] == pytest.approx(th["k"] / th["measured_k"])
    assert th["looseness_factor"] > 1
    assert summary["grid"]["points"] > 100 and summary["grid"]["mass_error"] < 1e-10


def test_weakly_convex_product_uses_theorem2():
    target = gl.ProductTarget("weakly_convex", 3)
    assert target.m == 0.0 and target.L == 1.0
    t2 = gl.theorem2_for(target, 0.1)
    track = gl.track_for(target, 0.01)
    assert t2.C1 == pytest.approx(track.w2_start(), rel=1e-12)
    # start N(0, I) vs p* ∝ 1/cosh: both symmetric, p* has E x² = π²/4
    assert t2.C2 == pytest.approx(np.sqrt(3 * np.pi ** 2 / 4), rel=1e-6)
    kl = gl.exact_kl(target, 0.05, 400)
    assert kl[-1] < kl[0]
