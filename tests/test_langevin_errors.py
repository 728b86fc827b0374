"""Bad input gets a clear ValueError: non-SPD covariance, h >= 2/L, non-finite or unimportable potentials."""

from __future__ import annotations

import numpy as np
import pytest

import gradlens.langevin as gl
from gradlens.cli import main as cli


def test_covariance_must_be_symmetric_positive_definite(tmp_path):
    with pytest.raises(ValueError, match="not symmetric positive definite: it is not symmetric"):
        gl.GaussianTarget(np.zeros(2), np.array([[1.0, 0.5], [0.2, 1.0]]))
    with pytest.raises(ValueError, match=r"not symmetric positive definite: smallest eigenvalue -1"):
        gl.GaussianTarget(np.zeros(2), np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="not symmetric positive definite: smallest eigenvalue"):
        gl.GaussianTarget(np.zeros(2), np.array([[1.0, 1.0], [1.0, 1.0]]))  # singular
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        gl.GaussianTarget(np.zeros(3), np.eye(2))
    path = tmp_path / "cov.npy"
    np.save(path, np.array([[1.0, 0.0], [0.0, -3.0]]))
    with pytest.raises(ValueError, match=r"cov\.npy: covariance is not symmetric positive definite"):
        gl.GaussianTarget.from_files(cov_path=path)
    target = gl.GaussianTarget(np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="init_cov: covariance is not symmetric positive definite"):
        gl.exact_kl(target, 0.1, 3, init_cov=np.array([[1.0, 3.0], [3.0, 1.0]]))


def test_step_size_at_or_above_stability_limit_names_it():
    target = gl.GaussianTarget(np.zeros(2), np.diag([1.0, 0.25]))  # L = 4: limit 2/L = 0.5
    assert target.L == pytest.approx(4.0)
    for h in (0.5, 0.7):
        with pytest.raises(ValueError, match=r"stability limit 2/L = 0\.5 \(L = 4\)"):
            gl.exact_kl(target, h, 10)
    gl.exact_kl(target, 0.4999, 3)  # just below is accepted
    with pytest.raises(ValueError, match=r"stability limit 2/L = 1"):
        gl.exact_kl(gl.ProductTarget("strongly_convex", 3), 1.0, 10)
    with pytest.raises(ValueError, match=r"stability limit 2/L = 0\.5"):
        gl.ULASampler(target.potential_and_grad, 0.6, np.zeros((4, 2)), L=target.L)
    with pytest.raises(ValueError, match="positive finite"):
        gl.exact_kl(target, -0.1, 10)


def _write_module(tmp_path, monkeypatch):
    (tmp_path / "lg_user_pot.py").write_text(
        "import numpy as np\n"
        "def good(x):\n    return 0.5 * np.sum(x * x, 1), x\n"
        "def nan_once_far(x):\n"
        "    u = 0.5 * np.sum(x * x, 1)\n    u[np.abs(x[:, 0]) > 0.5] = np.inf\n    return u, x\n"
        "def wrong_shape(x):\n    return np.zeros(3), x\n"
        "not_callable = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)


def test_non_finite_user_potential_is_reported(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch)
    target = gl.UserTarget("lg_user_pot:nan_once_far", 2)
    with pytest.raises(ValueError, match=r"lg_user_pot:nan_once_far returned non-finite U or grad U for \d+ of 5"):
        target.potential_and_grad(np.linspace(-1, 1, 10).reshape(5, 2))
    x0 = np.zeros((50, 2))
    message = r"ULA iteration [1-9]\d*: potential lg_user_pot:nan_once_far returned non-finite"
    with pytest.raises(ValueError, match=message):
        gl.ULASampler(target.potential_and_grad, 0.5, x0).run(20)
    with pytest.raises(ValueError, match=r"must return U of shape \(4,\)"):
        gl.UserTarget("lg_user_pot:wrong_shape", 2).potential_and_grad(np.zeros((4, 2)))
    good = gl.UserTarget("lg_user_pot:good", 2)
    U, g = good.potential_and_grad(np.ones((3, 2)))
    assert np.allclose(U, 1.0) and g.shape == (3, 2)
    with pytest.raises(ValueError, match="no exact KL for a user target"):
        gl.exact_kl(good, 0.1, 3)


def test_unimportable_potential_is_reported(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_module_xyz': ModuleNotFoundError"):
        gl.UserTarget("no_such_module_xyz:f", 2)
    with pytest.raises(ValueError, match=r"module 'lg_user_pot' has no attribute 'missing'"):
        gl.UserTarget("lg_user_pot:missing", 2)
    with pytest.raises(ValueError, match="is not callable"):
        gl.UserTarget("lg_user_pot:not_callable", 2)
    with pytest.raises(ValueError, match="must look like 'module:function'"):
        gl.UserTarget("lg_user_pot", 2)
    with pytest.raises(ValueError, match="cannot import module 'nofile.py'"):
        gl.UserTarget("nofile.py:f", 2)
    assert gl.UserTarget(str(tmp_path / "lg_user_pot.py") + ":good", 2).dim == 2  # a file path works too


def test_cli_reports_bad_input_and_leaves_no_run(tmp_path, monkeypatch, capsys):
    _write_module(tmp_path, monkeypatch)
    cases = [
        (["--target", "user", "--potential", "no_such_module_xyz:f", "--dim", "2", "--step", "0.1"],
         "cannot import module"),
        (["--target", "user", "--potential", "lg_user_pot:nan_once_far", "--dim", "2", "--step", "0.1",
          "--steps", "5", "--particles", "50"], "non-finite"),
        (["--target", "gaussian", "--dim", "3", "--cond", "10", "--step", "0.2"], "stability limit 2/L = 0.2"),
        (["--cov", str(tmp_path / "missing.npy"), "--step", "0.1"], "covariance file not found"),
        (["--eps", "0.1,0.2"], "a single run takes one eps"),
        (["--step", "0.01", "--eps", "x"], "expected comma-separated numbers"),
        (["sweep", "--target", "product", "--phi", "weakly_convex", "--dims", "1"], "strongly convex"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        assert cli(["langevin", *args, "--out", str(out), "--no-tensorboard"]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists(), f"{args}: a failed start must leave no run directory"
