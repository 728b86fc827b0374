"""Cost of exact KL tracking against simply running ULA particles.

    python benchmarks/langevin_exact_kl.py                     # d = 1000, 10^4 steps, 1000 particles
    python benchmarks/langevin_exact_kl.py --steps 2000 --dense-steps 50

1. Gaussian target (d = 1000, eigenvalues log-spaced in [1, 10], random rotation):
   exact KL, relative Fisher information and W2 at every one of 10^4 steps
   (closed form, commuting start N(0, I/m)), against 1000 ULA particles for the same
   steps. The particles run (a) in Σ's eigenbasis, O(N d) per step, the cheapest
   simulation there is, over every step; and (b) in the original coordinates with the
   full precision matrix, O(N d²) per step, timed over --dense-steps and extrapolated
   (printed as such). The ratio is exact-tracking time / particle time.
2. Product target (strongly convex φ = x²/2 + log cosh x, d = 10, Theorem 1's h for
   eps = 0.1): density-grid tracking for 10^4 steps, KL only and KL + Fisher + W2.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import gradlens.langevin as gl


def timed(fn, repeat: int = 1):
    """Best wall time of ``repeat`` calls (the CPU may be shared) and the last result."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def gaussian(args) -> None:
    target = gl.GaussianTarget.random(args.dim, cond=args.cond, seed=0)
    h = args.h if args.h else 0.5 / target.L
    ks = np.arange(args.steps + 1)
    t_kl, kl = timed(lambda: gl.GaussianTrack(target, h).kl(ks), repeat=3)
    t_all, _ = timed(lambda: gl.GaussianTrack(target, h).metrics(ks), repeat=3)
    print(f"Gaussian d={args.dim}, cond={args.cond:g}, h={h:.3g}, {args.steps} steps (exact: best of 3)")
    print(f"  exact KL at every step                   : {t_kl:8.3f} s   (KL_0={kl[0]:.4g}, KL_final={kl[-1]:.4g})")
    print(f"  exact KL + Fisher + W2 at every step     : {t_all:8.3f} s")
    t_one, one = timed(lambda: gl.GaussianTrack(target, h).kl([10**7]), repeat=3)
    print(f"  exact KL at the single step k = 10^7     : {t_one * 1e3:8.3f} ms  (KL={one[0]:.4g})")

    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((args.particles, args.dim)) / np.sqrt(target.m)  # N(0, I/m): any basis
    frame = target.eigenbasis()
    sampler = gl.ULASampler(frame.potential_and_grad, h, x0.copy(), seed=2, L=target.L)
    t_eig, _ = timed(lambda: sampler.run(args.steps))
    print(f"  {args.particles} ULA particles, eigenbasis O(Nd)   : {t_eig:8.3f} s   "
          f"(ratio exact/particles = {t_all / t_eig:.4f})")
    _ = target.precision  # build the dense precision outside the timing
    dense = gl.ULASampler(target.potential_and_grad, h, x0.copy(), seed=2, L=target.L)
    t_dense, _ = timed(lambda: dense.run(args.dense_steps))
    per_step = t_dense / args.dense_steps
    print(f"  {args.particles} ULA particles, full matrix O(Nd^2): {per_step * args.steps:8.3f} s   "
          f"(extrapolated from {args.dense_steps} steps at {per_step * 1e3:.2f} ms/step; "
          f"ratio exact/particles = {t_all / (per_step * args.steps):.5f})")


def product(args) -> None:
    d, eps = 10, 0.1
    target = gl.ProductTarget("strongly_convex", d)
    h, _ = gl.theorem1(d, eps, target.m, target.L)
    track = gl.track_for(target, h)
    ks = np.arange(args.steps + 1)
    t_kl, kl = timed(lambda: track.kl(ks))
    t_all, _ = timed(lambda: track.metrics(ks))
    print(f"Product target strongly_convex, d={d}, h={h:.3g} (Theorem 1, eps={eps}), {args.steps} steps, "
          f"grid {track.n} points, {track.K._nnz()} kernel entries")
    print(f"  exact KL at every step                   : {t_kl:8.3f} s   (KL_0={kl[0]:.4g}, KL_final={kl[-1]:.4g})")
    print(f"  exact KL + Fisher + W2 at every step     : {t_all:8.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1000)
    parser.add_argument("--cond", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--dense-steps", type=int, default=100)
    parser.add_argument("--h", type=float, default=None, help="Gaussian step size (default: 0.5/L)")
    args = parser.parse_args()
    print(f"numpy {np.__version__}, torch {torch.__version__}, torch threads {torch.get_num_threads()}")
    gaussian(args)
    product(args)


if __name__ == "__main__":
    main()
