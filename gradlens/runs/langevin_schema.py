"""Column names of Langevin run tables and their TensorBoard layout (torch-free:
the Langevin runner writes these names, `gradlens plot` reads them).

The same names are the CSV headers of ``steps.csv`` / ``sweep.csv`` and the
TensorBoard scalar tags, so a curve can be found by one name everywhere.

A Langevin run directory is an ordinary gradlens run directory (``kind`` =
"langevin"). ``config.json``'s ``config.mode`` says what it holds:

``mode = "run"``    one ULA run; ``steps.csv`` has one row per logged iteration
                    (columns ``STEP_COLUMNS``).
``mode = "sweep"``  a grid of (d, eps); ``steps.csv`` has one row per cell, ``step`` =
                    cell index (columns ``step`` + ``SWEEP_COLUMNS``). Keeping the sweep
                    in the steps table lets ``gradlens plot`` find and read it like any run.
"""

from __future__ import annotations

MODE_RUN = "run"
MODE_SWEEP = "sweep"

# --- steps.csv (mode "run") -------------------------------------------------
STEP = "step"                      # iteration k (p_0 is the start)
KL = "kl"                          # exact KL(p_k || p*): closed form (Gaussian) or grid (product)
KL_STATIONARY = "kl_stationary"    # KL(p_inf || p*) of ULA's own stationary law at this h
KL_DECREMENT = "kl_decrement"      # KL(p_k) - KL(p_{k+1}), exact
FISHER = "fisher"                  # relative Fisher information E_{p_k} |grad log(p_k / p*)|^2
H_FISHER = "h_fisher"              # h * fisher: the gradient-flow prediction of kl_decrement
W2 = "w2"                          # W2(p_k, p*): closed form (Gaussian), quantiles (product)
GRAD_U_NORM = "grad_u_norm"        # mean |grad U(x)| over the particles at iteration k
BOUND_THEOREM1 = "bound/theorem1"  # e^{-mhk}KL_0 + 8hdL²/m, the curve of Theorem 1's proof: Vempala-Wibisono
                                   # with α = m, NaN where h > m/(4L²) (not a bound there); same values as BOUND_VW
BOUND_CONTRACTION = "bound/contraction"  # e^{-m h k} KL_0, the contraction term alone
BOUND_VW = "bound/vempala_wibisono"      # Vempala & Wibisono (2019) bound (LSI)
KL_ESTIMATE = "kl_estimate/knn"          # k-NN estimate from particles: an ESTIMATE, noisy
KL_ESTIMATE_LO = "kl_estimate/knn_lo"    # bootstrap interval of the estimate
KL_ESTIMATE_HI = "kl_estimate/knn_hi"

STEP_COLUMNS = [
    STEP, KL, KL_STATIONARY, KL_DECREMENT, FISHER, H_FISHER, W2, GRAD_U_NORM,
    BOUND_THEOREM1, BOUND_CONTRACTION, BOUND_VW, KL_ESTIMATE, KL_ESTIMATE_LO, KL_ESTIMATE_HI,
]

# --- steps.csv of a sweep (mode "sweep") -------------------------------------
DIM = "d"
EPS = "eps"
KL0 = "kl0"
H_THEORY = "h_theory"              # Theorem 1 step size
K_THEORY = "k_theory"              # Theorem 1 iteration count
KL_AT_K_THEORY = "kl_at_k_theory"  # exact KL after k_theory steps at h_theory
BOUND_HOLDS = "bound_holds"        # 1 if kl_at_k_theory <= eps
K_MEASURED = "k_measured"          # smallest k with KL <= eps at h_theory (exact)
LOOSENESS = "looseness"            # k_theory / k_measured
H_BEST = "h_best"                  # step size that reaches eps in the fewest iterations
K_BEST = "k_best"                  # those iterations
KL_STATIONARY_BEST = "kl_stationary_best"

SWEEP_COLUMNS = [
    DIM, EPS, KL0, H_THEORY, K_THEORY, KL_AT_K_THEORY, BOUND_HOLDS, K_MEASURED, LOOSENESS,
    H_BEST, K_BEST, KL_STATIONARY_BEST,
]

# (category, [(chart title, [tag regexes])]) for TensorBoard's custom_scalars.
LANGEVIN_LAYOUT: list[tuple[str, list[tuple[str, list[str]]]]] = [
    (
        "gradlens: Langevin KL",
        [
            ("KL(p_k || p*) with Theorem 1 bound and stationary bias",
             ["^kl$", "^kl_stationary$", "^bound/", "^kl_estimate/"]),
            ("dissipation: KL decrement vs h * relative Fisher information", ["^kl_decrement$", "^h_fisher$"]),
            ("relative Fisher information", ["^fisher$"]),
            ("W2(p_k, p*)", ["^w2$"]),
            ("mean |grad U| over particles", ["^grad_u_norm$"]),
        ],
    )
]

SWEEP_LAYOUT: list[tuple[str, list[tuple[str, list[str]]]]] = [
    (
        "gradlens: Langevin sweep (x axis = d)",
        [
            ("iterations to reach eps", ["^sweep/k_"]),
            ("looseness = k_theory / k_measured", ["^sweep/looseness"]),
        ],
    )
]
