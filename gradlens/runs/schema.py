"""The run-directory format: file names and column names, the stable contract.

A run directory (``runs/NAME/``) holds:

``config.json``   resolved config, ``kind`` ("preference" or "langevin"), seed, versions
``steps.csv``     one row per optimizer step (or sampler iteration); append-only
``layers.csv``    long format: one row per (step, layer); append-only
``evals.csv``     one row per evaluation; append-only
``summary.json``  written once, at the end of a run
``events.out.tfevents.*``  TensorBoard event files (same scalar names as the CSVs)
``checkpoints/step_N/``    safetensors weights + optimizer state (weights_only loadable)

Every CSV row is written and flushed in one ``write`` call, so a run killed with
SIGKILL loses at most the row in flight; a partial last line is detected by the
reader, dropped and reported. CSV was chosen over JSONL because pandas' C parser
reads 10^6-row tables in about a second and it round-trips ``nan``/``inf``.
Floats are written with ``repr`` (shortest exact round trip).
"""

SCHEMA_VERSION = 1

CONFIG = "config.json"
STEPS = "steps.csv"
LAYERS = "layers.csv"
EVALS = "evals.csv"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"

KIND_PREFERENCE = "preference"
KIND_LANGEVIN = "langevin"

# Step-table columns of preference runs (TRL names where TRL has one).
STEP = "step"
LOSS = "loss"
LR = "lr"
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_MARGINS = "rewards/margins"
REWARDS_ACCURACIES = "rewards/accuracies"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
GRAD_NORM = "grad_norm"                   # ||g||, the whole gradient
GRAD_NORM_CHOSEN = "grad_norm/chosen"     # ||g_chosen||
GRAD_NORM_REJECTED = "grad_norm/rejected" # ||g_rejected||
GRAD_DOT = "grad/dot"                     # <g_chosen, g_rejected>
GRAD_COSINE = "grad/cosine"
GRAD_RATIO = "grad/ratio"                 # rho = ||g_rejected|| / ||g_chosen||
LOG_PW_OVER_PL = "log_pw_over_pl"         # mean log(p_w / p_l) = mean (l_w - l_l)
SIGMOID_NEG_U = "sigmoid_neg_u"           # mean sigma(-u)
WEIGHT_CHOSEN = "weights/chosen"          # mean a_w
WEIGHT_REJECTED = "weights/rejected"      # mean a_l
NONFINITE = "nonfinite"                   # 1 if the step's loss or gradient was not finite

# steps.csv column order of preference runs (`gradlens record` and the trainer callbacks).
PREFERENCE_STEP_COLUMNS = (
    STEP, LOSS,
    REWARDS_CHOSEN, REWARDS_REJECTED, REWARDS_MARGINS, REWARDS_ACCURACIES,
    LOGPS_CHOSEN, LOGPS_REJECTED, LR,
    GRAD_NORM, GRAD_NORM_CHOSEN, GRAD_NORM_REJECTED, GRAD_DOT, GRAD_COSINE, GRAD_RATIO,
    LOG_PW_OVER_PL, SIGMOID_NEG_U, WEIGHT_CHOSEN, WEIGHT_REJECTED, NONFINITE,
)  # fmt: skip

# Layer-table columns (long format).
LAYER = "layer"
CHOSEN_SQ = "chosen_sq"      # ||g_chosen restricted to the layer||^2
REJECTED_SQ = "rejected_sq"
DOT = "dot"

# Evaluation metrics (evals.csv) with a meaning the readers rely on.
EVAL_PREF_ACCURACY = "eval/pref_accuracy"              # implicit-reward accuracy on held-out pairs
EVAL_TRAIN_PAIR_ACCURACY = "eval/train_pair_accuracy"  # the same, on training pairs (user env without --eval-data)
