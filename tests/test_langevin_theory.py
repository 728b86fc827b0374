"""Theory: Theorem 1 holds where it claims to, the formulas, the searches for k and h, the k-NN estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradlens.langevin as gl
from gradlens.runs import langevin_schema as C
from gradlens.langevin.runner import SweepSpec, run_sweep


def test_theorem1_formula():
    h, k = gl.theorem1(10, 0.1, 1.0, 2.0)
    assert h == pytest.approx(0.1 * 1.0 / (16 * 10 * 4.0))
    assert k == math.ceil(16 * 4.0 * (10 / 0.1) * math.log(10 * 2.0 / 0.1))
    assert isinstance(k, int)
    with pytest.raises(ValueError, match="eps"):
        gl.theorem1(10, 0.0, 1.0, 2.0)


@pytest.mark.parametrize("d", [1, 10, 100, 1000])
def test_theorem1_holds_on_gaussians_at_its_h_and_k(d):
    target = gl.GaussianTarget.random(d, cond=10.0, seed=d)
    for eps in (0.1, 0.01):
        h, k = gl.theorem1(d, eps, target.m, target.L)
        track = gl.GaussianTrack(target, h)
        kl0, kl_k = track.kl([0, k])  # closed form at k up to ~10^9
        assert kl_k <= eps, f"d={d} eps={eps}: KL after Theorem 1's k = {kl_k}"
        measured = gl.smallest_k_to_eps(target, h, eps)
        assert 0 < measured <= k
        assert track.kl([measured])[0] <= eps < track.kl([measured - 1])[0]
        # the theory curve bounds the exact KL along the way
        ks = np.unique(np.geomspace(1, k, 50).astype(np.int64))
        assert np.all(track.kl(ks) <= gl.theorem1_bound(ks, h, d, target.m, target.L, kl0))


def test_sweep_reports_looseness_and_bounds(tmp_path):
    summary = run_sweep(SweepSpec(dims=[1, 10, 100, 1000], eps=[0.1], best_h=False), tmp_path / "sweep",
                        tensorboard=False, echo=lambda s: None)
    assert summary["all_bounds_hold"] is True
    from gradlens.runs import load_run

    run = load_run(tmp_path / "sweep")
    assert run.kind == "langevin" and run.config["mode"] == C.MODE_SWEEP
    table = run.steps
    assert list(table[C.DIM]) == [1, 10, 100, 1000]
    assert (table[C.BOUND_HOLDS] == 1).all()
    assert np.allclose(table[C.LOOSENESS], table[C.K_THEORY] / table[C.K_MEASURED])
    assert (table[C.LOOSENESS] > 1).all()
    assert 1.0 < summary["slope_d"][C.K_MEASURED]["0.1"] < 1.5


def test_vempala_wibisono_and_theorem2_formulas():
    b = gl.vempala_wibisono_bound([0, 10], 0.01, 5, 1.0, 2.0, 3.0)
    assert b[0] == pytest.approx(3.0 + 8 * 0.01 * 5 * 4.0)
    assert b[1] == pytest.approx(math.exp(-0.1) * 3.0 + 8 * 0.01 * 5 * 4.0)
    assert np.isnan(gl.vempala_wibisono_bound([0], 1.0 / 16 + 1e-9, 5, 1.0, 2.0, 3.0)).all()  # h > α/(4L²)
    h, k = gl.vempala_wibisono(5, 0.1, 1.0, 2.0, 3.0)
    assert h == pytest.approx(0.1 / (16 * 5 * 4.0)) and k == math.ceil(math.log(60.0) / h)
    t2 = gl.theorem2(4, 0.1, 2.0, C1=1.5, C2=3.0, kl0=5.0, h0=0.2)
    expect_h = min(0.1 / (1.5 * 4.5 * 4.0), 0.01 / (2.25 * 4 * 4.0), 0.2) / 48
    assert t2.h == pytest.approx(expect_h)
    assert t2.k == math.ceil(2 * 2.25 / (0.1 * expect_h) + 2 * 2.25 * math.log(5.0) / expect_h)
    assert gl.theorem2(4, 0.1, 2.0, C1=1.5, C2=3.0, kl0=5.0).h0 == 0.5  # default h0 = 1/L


def test_best_h_beats_a_scan_of_step_sizes():
    target = gl.GaussianTarget.random(20, cond=5.0, seed=3)
    eps = 0.05
    h_best, k_best = gl.best_h_for_eps(target, eps)
    assert gl.smallest_k_to_eps(target, h_best, eps) == k_best
    assert gl.stationary_kl(target, h_best) <= eps
    scan = []
    for h in np.geomspace(1e-4, 2.0 / target.L * 0.999, 200):
        k = gl.smallest_k_to_eps(target, h, eps)
        if k is not None:
            scan.append(k)
    assert k_best <= min(scan)
    th_h, th_k = gl.theorem1(20, eps, target.m, target.L)
    assert k_best < gl.smallest_k_to_eps(target, th_h, eps) < th_k


def test_knn_estimate_brackets_the_exact_kl():
    rng = np.random.default_rng(0)
    p_mean, p_sd = np.array([0.6, -0.3]), np.array([1.3, 0.7])
    x = p_mean + p_sd * rng.standard_normal((3000, 2))
    y = rng.standard_normal((3000, 2))
    exact = 0.5 * np.sum(p_sd ** 2 - 1 - np.log(p_sd ** 2) + p_mean ** 2)
    est = gl.knn_kl(x, y, k=5)
    assert est.lo <= est.value <= est.hi
    width = est.hi - est.lo
    assert est.lo - width <= exact <= est.hi + width
    assert "estimate" in est.method.lower()
    same = gl.knn_kl(rng.standard_normal((3000, 2)), y, k=5)
    assert abs(same.value) < 0.05
    with pytest.raises(ValueError, match="more than 5 particles"):
        gl.knn_kl(x[:3], y, k=5)
