"""``gradlens langevin [run|sweep]``: the command line over ``runner.py``.

    gradlens langevin --target gaussian --dim 10 --cond 10 --eps 0.1
    gradlens langevin --target product --phi strongly_convex --dim 10 --step 1e-3 --steps 5000
    gradlens langevin --target user --potential mypot:U --dim 2 --step 0.01 --steps 2000 --L 4
    gradlens langevin sweep --dims 1,10,100,1000 --eps 0.1,0.03,0.01

The first word after ``langevin`` picks the action (``run`` when omitted), because the
top-level dispatcher already used ``langevin`` to choose this module.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from ..runs import (
    RunLock, check_name_lengths, check_not_inside_a_run, check_overwritable, restore_replaced, run_contents, schema,
)
from ..runs.run_dir import clear_run_files, missing_folders, remove_empty_folders
from .targets import POTENTIALS_1D

ACTIONS = ("run", "sweep")
DEFAULT_ROOT = Path("runs") / "langevin"
EXIT_USAGE = 2
MIN_EPS = 1e-12  # smaller KL targets make Theorem 1's iteration count overflow


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=ACTIONS, default="run",
                        help="run: one ULA run (default); sweep: iterations to reach eps over a grid of d and eps")
    t = parser.add_argument_group("target")
    t.add_argument("--target", choices=("gaussian", "product", "user"), default="gaussian",
                   help="gaussian N(mu, Sigma); product of 1-D potentials; user potential (default: gaussian)")
    t.add_argument("--dim", type=int, default=10, help="dimension d (default: 10)")
    t.add_argument("--cond", type=float, default=10.0,
                   help="gaussian: condition number L/m; precision eigenvalues log-spaced in [m, L] (default: 10)")
    t.add_argument("--m", type=float, default=None,
                   help="strong convexity m (gaussian generated: smallest precision eigenvalue, default 1; "
                        "user: enables Theorem 1 and the start N(0, I/m))")
    t.add_argument("--L", type=float, default=None, help="smoothness L (user: enables the 2/L stability check)")
    t.add_argument("--mean", default=None, metavar="FILE", help="gaussian: mean vector (.npy or .txt)")
    t.add_argument("--cov", default=None, metavar="FILE", help="gaussian: covariance matrix (.npy or .txt)")
    t.add_argument("--seed", type=int, default=0, help="rotation of the generated gaussian, particles (default: 0)")
    t.add_argument("--phi", choices=sorted(POTENTIALS_1D), default="strongly_convex",
                   help="product: 1-D potential (strongly_convex: x^2/2 + log cosh x, m=1, L=2; "
                        "weakly_convex: log cosh x, m=0, L=1; quadratic: x^2/2)")
    t.add_argument("--potential", default=None, metavar="MODULE:FUNCTION",
                   help="user: f(x) -> (U, grad U) for x of shape (N, d); 'path/file.py:f' works too")
    r = parser.add_argument_group("run")
    r.add_argument("--step", type=float, default=None, metavar="H", help="ULA step size h")
    r.add_argument("--eps", default=None, metavar="EPS[,EPS...]",
                   help="target KL; without --step Theorem 1 (or 2) sets h and the steps (sweep: a comma list, "
                        "default 0.1,0.03,0.01)")
    r.add_argument("--steps", type=int, default=None, help="iterations (default: Theorem's k with --eps, else 1000)")
    r.add_argument("--particles", type=int, default=-1,
                   help="ULA particles for mean |grad U| and the k-NN estimate (default: 1000, or 0 when the run "
                        "would be too long for them)")
    r.add_argument("--init-mean", default=None, metavar="X|FILE", help="start mean (default: 0)")
    r.add_argument("--init-cov", default=None, metavar="V|FILE", help="start covariance: variance or matrix "
                                                                      "(default: I/m, or I when m = 0)")
    r.add_argument("--knn-every", type=int, default=None, metavar="N",
                   help="k-NN KL estimate every N steps (default: ~50 per run for user targets, off otherwise)")
    r.add_argument("--knn-k", type=int, default=5, help="k of the k-NN estimator (default: 5)")
    r.add_argument("--reference-steps", type=int, default=1000,
                   help="user targets: MALA steps for the p* reference sample (default: 1000)")
    r.add_argument("--max-rows", type=int, default=5000, help="most steps.csv rows; beyond, log-spaced (default: 5000)")
    r.add_argument("--no-grid-check", action="store_true", help="product: skip the coarser-grid error estimate")
    s = parser.add_argument_group("sweep")
    s.add_argument("--dims", default="1,10,100,1000", help="comma-separated dimensions (default: 1,10,100,1000)")
    s.add_argument("--no-best-h", action="store_true", help="skip the search for the best step size per cell")
    s.add_argument("--max-work", type=float, default=3e9,
                   help="product sweep: grid work cap per cell, steps x kernel entries, about 1 ns each; "
                        "cells beyond it report n/a (default: 3e9)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="DIR", help=f"run directory (default: {DEFAULT_ROOT}/NAME-TIME)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    o.add_argument("--label", default=None, help="group label for `gradlens plot` (default: from the settings)")
    o.add_argument("--no-tensorboard", action="store_true", help="skip TensorBoard event files")
    o.add_argument("--config", metavar="FILE", help="TOML, JSON or YAML file of settings (same names as the flags); flags override it")
    o.add_argument("--quiet", action="store_true", help="no progress messages (errors are still printed)")


def _option_defaults() -> tuple[dict, dict]:
    """(dest -> default, dest -> argparse action) of this command's options."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    return {dest: a.default for dest, a in actions.items()}, actions


def apply_config_file(args: argparse.Namespace) -> None:
    """Fill every option the command line left at its default from ``--config``.

    Names and values are checked like flags (type and choices); the file's
    problems are reported with its path.
    """
    from ..settings_file import read_settings_file, shown

    path = args.config
    defaults, actions = _option_defaults()
    for written, value in read_settings_file(path).items():
        key = str(written).replace("-", "_")
        action = actions.get(key)
        if action is None or key in ("config", "help"):
            known = ", ".join(sorted(k for k in actions if k not in ("config", "help")))
            raise ValueError(f"{path}: unknown setting {shown(key)}; known settings: {known}")
        if action.nargs == 0:  # a switch such as --overwrite
            if not isinstance(value, bool):
                raise ValueError(f"{path}: {key!r} must be true or false, got {shown(value)}")
        elif action.type is not None:
            wrong = isinstance(value, bool) or (action.type is int and not isinstance(value, int))
            try:
                converted = None if wrong else action.type(value)
            except (TypeError, ValueError):
                wrong = True
            if wrong:
                raise ValueError(f"{path}: {key!r} must be a {action.type.__name__}, got {shown(value)}")
            value = converted
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)  # --eps / --dims lists
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{path}: {key!r} must be one of {', '.join(map(str, action.choices))}, got {shown(value)}")
        if getattr(args, key) == defaults[key]:
            setattr(args, key, value)


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values:
        raise ValueError(f"{flag} {text!r}: expected at least one number")
    return values


def _ints(text: str, flag: str) -> list[int]:
    values = _floats(text, flag)
    if any(v != int(v) or v < 1 for v in values):
        raise ValueError(f"{flag} {text!r}: expected positive whole numbers")
    return [int(v) for v in values]


def _default_out(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = DEFAULT_ROOT / f"{name}-{stamp}"
    n = 2
    while path.exists():
        path = DEFAULT_ROOT / f"{name}-{stamp}-{n}"
        n += 1
    return path


def _echo(args: argparse.Namespace):
    return (lambda message: None) if args.quiet else print


# Bytes per float64 and how many (particles x d) and (d x d) arrays a run holds at once
# (particles, gradients, noise, a copy; covariance, precision, eigenvectors, temporaries).
_F64, _PARTICLE_ARRAYS, _MATRIX_ARRAYS = 8, 4, 6


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def check_memory(args: argparse.Namespace) -> None:
    """Refuse a run whose largest arrays alone need more memory than the machine has free."""
    d = args.dim
    particles = args.particles if args.particles >= 0 else 1000
    need = _PARTICLE_ARRAYS * particles * d * _F64
    if args.target == "gaussian":
        need += _MATRIX_ARRAYS * d * d * _F64
    free = _available_memory()
    if free is not None and need > free:
        raise ValueError(
            f"--dim {d} with {particles} particles needs about {need / 2**30:.1f} GiB for its arrays, "
            f"but this machine has {free / 2**30:.1f} GiB free; lower --dim or --particles (0 turns particles off)"
        )


def _check_flags(args: argparse.Namespace) -> None:
    if args.dim < 1:
        raise ValueError(f"--dim must be at least 1, got {args.dim}")
    if args.knn_k < 1:
        raise ValueError(f"--knn-k must be at least 1, got {args.knn_k}")
    for flag, value in (("--steps", args.steps), ("--knn-every", args.knn_every)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} must be 0 or more, got {value}")
    for flag, value, least in (("--max-rows", args.max_rows, 2), ("--reference-steps", args.reference_steps, 1), ("--particles", args.particles, -1)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if args.eps is not None:
        for eps in _floats(args.eps, "--eps"):
            if not (MIN_EPS <= eps < math.inf):
                raise ValueError(f"--eps {eps:g}: must be a KL target from {MIN_EPS:g} up (below it the iteration counts overflow)")
    check_memory(args)
    if args.action == "run" and args.step is None and args.eps is None:
        raise ValueError("pass --step H (the ULA step size) or --eps EPS (Theorem 1 then chooses h and the steps), "
                         "e.g. gradlens langevin --target gaussian --dim 10 --eps 0.1")


def _write_guarded(out: Path, overwrite: bool, write) -> None:
    """``write()`` under the run directory's writer lock; an error before the first row leaves nothing.

    The checks ``prepare_run_dir`` makes later are made here first, so a refusal
    creates nothing. A directory this call started is removed again when the run
    fails before logging a row (the files are all its own); a run that logged rows
    keeps them.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    check_not_inside_a_run(out)
    check_name_lengths(out)
    if not overwrite:
        restore_replaced(out)  # a run an interrupted --overwrite set aside goes back first
    started = out.is_dir() and run_contents(out).started
    if started and not overwrite:
        raise ValueError(f"{out}: run directory already exists and is not empty; pass --overwrite to replace it (it was left unchanged)")
    if started:
        check_overwritable(out)
    made = missing_folders(out)
    lock = RunLock(out)
    try:
        lock.acquire()
    except OSError as exc:
        raise ValueError(f"{out}: cannot create the run directory: {exc.strerror or exc}") from None
    try:
        write()
    except Exception:
        steps = out / schema.STEPS
        if steps.is_file() and steps.read_bytes().count(b"\n") > 1:
            raise
        contents = run_contents(out)
        if not contents.foreign:
            clear_run_files(out, contents)
        lock.release()
        restore_replaced(out)  # the run an --overwrite set aside comes back: the new one logged nothing
        raise
    finally:
        lock.release()
        remove_empty_folders(made)  # only folders this call created, and only when empty


def _run(args: argparse.Namespace) -> None:
    from .runner import RunSpec, run_langevin

    eps = None
    if args.eps is not None:
        values = _floats(args.eps, "--eps")
        if len(values) != 1:
            raise ValueError(f"--eps {args.eps!r}: a single run takes one eps (lists are for `langevin sweep`)")
        eps = values[0]
    spec = RunSpec(
        target=args.target, dim=args.dim, cond=args.cond, m=args.m, L=args.L, mean_file=args.mean,
        cov_file=args.cov, seed=args.seed, phi=args.phi, potential=args.potential, step=args.step, eps=eps,
        steps=args.steps, particles=args.particles, init_mean=args.init_mean, init_cov=args.init_cov,
        knn_every=args.knn_every, knn_k=args.knn_k, reference_steps=args.reference_steps,
        max_rows=args.max_rows, grid_check=not args.no_grid_check, label=args.label,
    )
    name = f"{args.target}-d{args.dim}" + (f"-{args.phi}" if args.target == "product" else "")
    out = Path(args.out) if args.out else _default_out(name)
    _write_guarded(out, args.overwrite, lambda: run_langevin(spec, out, overwrite=args.overwrite, tensorboard=not args.no_tensorboard, echo=_echo(args)))


def _sweep(args: argparse.Namespace) -> None:
    from .runner import SweepSpec, run_sweep

    if args.target == "user":
        raise ValueError("a sweep measures exact iterations to eps: use --target gaussian or product")
    spec = SweepSpec(
        dims=_ints(args.dims, "--dims"), eps=_floats(args.eps or "0.1,0.03,0.01", "--eps"), target=args.target,
        cond=args.cond, m=1.0 if args.m is None else args.m, seed=args.seed, phi=args.phi,
        best_h=not args.no_best_h, max_work=args.max_work, label=args.label,
    )
    out = Path(args.out) if args.out else _default_out(f"sweep-{args.target}")
    _write_guarded(out, args.overwrite, lambda: run_sweep(spec, out, overwrite=args.overwrite, tensorboard=not args.no_tensorboard, echo=_echo(args)))


def main(args: argparse.Namespace) -> int:
    try:
        if args.config:
            apply_config_file(args)
        _check_flags(args)
        (_sweep if args.action == "sweep" else _run)(args)
    except ValueError as exc:
        print(f"gradlens langevin: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OverflowError, MemoryError) as exc:
        print(f"gradlens langevin: error: these settings need more than can be computed ({type(exc).__name__}: {exc}); "
              "use a larger --eps, a smaller --dim or fewer --steps", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"gradlens langevin: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
