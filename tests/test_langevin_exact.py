"""Exact Gaussian KL of ULA against independent computations.

References: the full-matrix mean/covariance recursion in the original (rotated)
coordinates in float64, the discrete Lyapunov equation solved by Kronecker
products, and a 10^5-particle ULA simulation with full-matrix gradients.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

import gradlens.langevin as gl
from gradlens.langevin.exact_gaussian import GaussianTrack, t_minus_log1p


def rotated_target(d=6, lo=1.0, hi=20.0, seed=1, mean_scale=1.0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = np.geomspace(lo, hi, d)
    cov = (Q / a) @ Q.T
    return cov, mean_scale * rng.standard_normal(d)


def gaussian_kl(m, C, mu, Sigma):
    """KL(N(m, C) || N(mu, Sigma)) with full matrices: Cholesky whitening, then eigenvalues."""
    Lc = np.linalg.cholesky(Sigma)
    Li = np.linalg.inv(Lc)
    B = Li @ C @ Li.T
    lam = np.linalg.eigvalsh(0.5 * (B + B.T))
    z = Li @ (m - mu)
    return 0.5 * (np.sum(lam - 1.0 - np.log(lam)) + z @ z)


def reference_kl(cov, mu, h, steps, m0, C0):
    """Independent full-matrix recursion: m <- m - h Σ^{-1}(m - μ), C <- M C M + 2h I."""
    d = len(mu)
    P = np.linalg.inv(cov)
    M = np.eye(d) - h * P
    m, C = m0.copy(), C0.copy()
    out = []
    for _ in range(steps + 1):
        out.append(gaussian_kl(m, C, mu, cov))
        m = m - h * P @ (m - mu)
        C = M @ C @ M + 2.0 * h * np.eye(d)
    return np.array(out)


def starts(d, cov, rng):
    A = rng.standard_normal((d, d))
    w, V = np.linalg.eigh(cov)
    return {
        "default N(0, I/m)": (None, None),
        "shifted mean": (rng.standard_normal(d), None),
        "commuting covariance": (None, (V * (rng.random(d) + 0.3)) @ V.T),
        "non-commuting covariance": (rng.standard_normal(d), A @ A.T + 0.3 * np.eye(d)),
    }


@pytest.mark.parametrize("h", [0.01, 0.06])
def test_exact_kl_matches_full_matrix_recursion(h):
    d = 6
    cov, mu = rotated_target(d)
    target = gl.GaussianTarget(mu, cov)
    rng = np.random.default_rng(2)
    for name, (m0, C0) in starts(d, cov, rng).items():
        kl = gl.exact_kl(target, h, 300, init_mean=m0, init_cov=C0)
        assert kl.dtype == np.float64 and kl.shape == (301,)
        ref = reference_kl(cov, mu, h, 300, np.zeros(d) if m0 is None else m0,
                           np.eye(d) / target.m if C0 is None else C0)
        rel = np.max(np.abs(kl - ref) / ref)
        assert rel <= 1e-8, f"{name}: max relative error {rel:.3g}"
        expected_commuting = name != "non-commuting covariance"
        assert GaussianTrack(target, h, m0, C0).commuting is expected_commuting


def test_closed_form_any_k_in_O_d():
    # A single far step from the geometric series equals the recursion at that step ...
    d = 4
    cov, mu = rotated_target(d, 1.0, 5.0, seed=3)
    target = gl.GaussianTarget(mu, cov)
    track = GaussianTrack(target, 0.002)
    ref = reference_kl(cov, mu, 0.002, 3000, np.zeros(d), np.eye(d) / target.m)
    assert abs(track.kl([3000])[0] - ref[3000]) <= 1e-8 * ref[3000]
    # ... and k = 10^7 in d = 1000 is one O(d) evaluation (no iteration).
    big = gl.GaussianTarget.random(1000, 10.0, seed=0)
    h, _ = gl.theorem1(1000, 0.1, big.m, big.L)
    track = GaussianTrack(big, h)
    t0 = time.perf_counter()
    kl = track.kl([10**7])[0]
    assert time.perf_counter() - t0 < 0.5
    assert np.isfinite(kl) and kl > track.kl_stationary


def test_exact_kl_agrees_with_1e5_particle_monte_carlo():
    d, n, groups = 3, 100_000, 20
    cov, mu = rotated_target(d, 0.5, 4.0, seed=4)
    target = gl.GaussianTarget(mu, cov)
    h, m0, C0 = 0.1, np.array([1.0, -0.5, 0.3]), np.diag([0.4, 1.5, 0.8])
    track = GaussianTrack(target, h, m0, C0)
    rng = np.random.default_rng(5)
    x0 = m0 + rng.standard_normal((n, d)) @ np.linalg.cholesky(C0).T
    sampler = gl.ULASampler(target.potential_and_grad, h, x0, seed=6, L=target.L)  # full-matrix gradients
    checked = 0
    for k in range(13):
        if k in (1, 4, 12):
            x = sampler.x
            est = gaussian_kl(x.mean(0), np.cov(x.T), mu, cov)
            # delete-a-group jackknife: bias-corrected estimate and its standard error
            parts = np.array_split(np.arange(n), groups)
            loo = []
            for p in parts:
                keep = np.ones(n, bool)
                keep[p] = False
                loo.append(gaussian_kl(x[keep].mean(0), np.cov(x[keep].T), mu, cov))
            loo = np.array(loo)
            se = math.sqrt((groups - 1) / groups * np.sum((loo - loo.mean()) ** 2))
            corrected = groups * est - (groups - 1) * loo.mean()
            exact = track.kl([k])[0]
            assert abs(corrected - exact) <= 4.0 * se, f"k={k}: MC {corrected:.5g} ± {se:.2g} vs exact {exact:.5g}"
            mean_k, cov_k = track.moments(k)
            assert np.all(np.abs(x.mean(0) - mean_k) <= 5.0 * np.sqrt(np.diag(cov_k) / n))
            checked += 1
        sampler.step()
    assert checked == 3


def test_stationary_bias_formula_is_the_recursion_fixed_point():
    d = 5
    cov, mu = rotated_target(d, 1.0, 8.0, seed=7)
    target = gl.GaussianTarget(mu, cov)
    P = np.linalg.inv(cov)
    for h in (0.01, 0.1, 0.2):
        M = np.eye(d) - h * P
        # fixed point of S = M S M + 2h I: (I - M ⊗ M) vec S = 2h vec I
        S = np.linalg.solve(np.eye(d * d) - np.kron(M, M), 2.0 * h * np.eye(d).reshape(-1)).reshape(d, d)
        assert np.allclose(gl.stationary_cov(target, h), S, rtol=1e-10, atol=1e-12)
        formula = cov @ np.linalg.inv(np.eye(d) - 0.5 * h * P)  # Σ (I - (h/2) Σ^{-1})^{-1}
        assert np.allclose(formula, S, rtol=1e-10, atol=1e-12)
        fixed = gaussian_kl(mu, S, mu, cov)
        assert abs(gl.stationary_kl(target, h) - fixed) <= 1e-8 * fixed
        # and the closed form converges to it
        track = GaussianTrack(target, h)
        assert abs(track.kl([10**7])[0] - fixed) <= 1e-8 * fixed
        assert track.kl_stationary == pytest.approx(fixed, rel=1e-8)


def test_fisher_and_w2_against_full_matrix_formulas():
    d = 4
    cov, mu = rotated_target(d, 1.0, 6.0, seed=8)
    target = gl.GaussianTarget(mu, cov)
    P = np.linalg.inv(cov)
    rng = np.random.default_rng(9)
    A = rng.standard_normal((d, d))
    for m0, C0 in ((None, None), (rng.standard_normal(d), A @ A.T + 0.5 * np.eye(d))):
        track = GaussianTrack(target, 0.05, m0, C0)
        metrics = track.metrics([0, 3, 40])
        for i, k in enumerate((0, 3, 40)):
            m, S = track.moments(k)
            Si = np.linalg.inv(S)
            fisher = np.trace((P - Si) @ S @ (P - Si)) + np.sum((P @ (m - mu)) ** 2)
            w, V = np.linalg.eigh(cov)
            root = (V * np.sqrt(w)) @ V.T
            inner = np.linalg.eigvalsh(root @ S @ root)
            w2 = math.sqrt(np.sum((m - mu) ** 2) + np.trace(S) + np.trace(cov) - 2.0 * np.sum(np.sqrt(inner)))
            assert metrics["fisher"][i] == pytest.approx(fisher, rel=1e-9)
            assert metrics["w2"][i] == pytest.approx(w2, rel=1e-7)
            assert metrics["kl"][i] == pytest.approx(gaussian_kl(m, S, mu, cov), rel=1e-9)


def test_dissipation_identity_in_the_small_step_limit():
    # d/dt KL = -Fisher: per step, KL_k - KL_{k+1} = h Fisher_k (1 + O(h)).
    cov, mu = rotated_target(3, 1.0, 3.0, seed=10)
    target = gl.GaussianTarget(mu, cov)
    for h, tol in ((1e-3, 2e-2), (1e-4, 2e-3)):
        track = GaussianTrack(target, h, init_mean=np.ones(3))
        m = track.metrics([0, 1])
        ratio = (m["kl"][0] - m["kl"][1]) / (h * m["fisher"][0])
        assert abs(ratio - 1.0) < tol


def test_first_k_below_is_exact_even_when_kl_is_not_monotone():
    # Start narrower than the target, stationary law wider: KL dips through 0 then rises to the bias.
    target = gl.GaussianTarget(np.zeros(1), np.eye(1))
    track = GaussianTrack(target, 0.02, init_cov=0.5)
    kl = track.kl(np.arange(3000))
    assert np.argmin(kl) not in (0, len(kl) - 1)  # really non-monotone
    for eps in (0.05, 0.01, 1e-3, kl.min() * 1.0001):
        brute = int(np.flatnonzero(kl <= eps)[0])
        assert track.first_k_below(eps) == brute
    assert track.first_k_below(kl.min() * 0.5) is None
    # rotated, non-commuting start: stepping path agrees with the closed-form path's definition
    cov, mu = rotated_target(3, 1.0, 4.0, seed=11)
    t3 = gl.GaussianTarget(mu, cov)
    nc = GaussianTrack(t3, 0.05, np.ones(3), np.diag([2.0, 0.5, 1.0]))
    kl3 = gl.exact_kl(t3, 0.05, 400, np.ones(3), np.diag([2.0, 0.5, 1.0]))
    assert nc.first_k_below(0.01) == int(np.flatnonzero(kl3 <= 0.01)[0])
    assert gl.smallest_k_to_eps(t3, 0.05, 0.01, init_mean=np.ones(3), init_cov=np.diag([2.0, 0.5, 1.0])) == \
        nc.first_k_below(0.01)


def test_t_minus_log1p_series_branch():
    t = np.array([-0.049, -1e-6, 0.0, 1e-9, 0.03, 0.049])
    exact = np.array([float(np.float64(x) - np.log1p(np.float64(x))) for x in t])
    series = t_minus_log1p(t)
    assert np.allclose(series[np.abs(t) > 1e-3], exact[np.abs(t) > 1e-3], rtol=1e-12)
    assert series[1] == pytest.approx(0.5e-12 + 1e-18 / 3, rel=1e-12)
    assert series[2] == 0.0


def test_gaussian_targets_from_files_and_from_dim_cond_seed(tmp_path):
    cov, mu = rotated_target(3, 1.0, 4.0, seed=12)
    np.save(tmp_path / "cov.npy", cov)
    np.savetxt(tmp_path / "mean.txt", mu)
    from_files = gl.GaussianTarget.from_files(tmp_path / "mean.txt", tmp_path / "cov.npy")
    assert np.allclose(from_files.cov, cov, rtol=1e-12) and np.allclose(from_files.mean, mu)
    assert np.allclose(gl.exact_kl(from_files, 0.1, 20), gl.exact_kl(gl.GaussianTarget(mu, cov), 0.1, 20), rtol=1e-12)
    gen = gl.GaussianTarget.random(6, cond=50.0, seed=3)
    assert (gen.m, gen.L) == (1.0, 50.0)
    assert np.allclose(np.sort(gen.a), np.geomspace(1.0, 50.0, 6))  # precision eigenvalues log-spaced in [m, L]
    assert np.allclose(gen.Q.T @ gen.Q, np.eye(6), atol=1e-12) and not np.allclose(gen.Q, np.eye(6))
    assert np.allclose(np.linalg.inv(gen.cov), gen.precision, rtol=1e-9)
    again = gl.GaussianTarget.random(6, cond=50.0, seed=3)
    assert np.array_equal(again.Q, gen.Q)
    assert not np.allclose(gl.GaussianTarget.random(6, cond=50.0, seed=4).Q, gen.Q)
