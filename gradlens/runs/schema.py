"""The run-directory format: file names and column names, the stable contract.

A run directory (``runs/NAME/``) holds:

``config.json``   resolved config, ``kind`` ("preference" or "langevin"), seed, versions
``steps.csv``     one row per optimizer step (or sampler iteration); append-only
``layers.csv``    long format: one row per (step, layer); append-only
``evals.csv``     one row per evaluation; append-only
``summary.json``  written once, at the end of a run
``events.out.tfevents.*``  TensorBoard event files (same scalar names as the CSVs)
``checkpoints/step_N/``    safetensors weights + optimizer state (weights_only loadable); with
                  a Hugging Face model, also its ``config.json`` and tokenizer (``from_pretrained``)

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
ROWS = "rows.csv"          # --per-row: one row per (step, pair, side)
LOCK = ".gradlens.lock"    # the writer lock (runs/lock.py); present only while a writer runs or after a kill

# summary.json "status" of a preference run (Langevin summaries have none: written only at the end).
STATUS_COMPLETE = "complete"
STATUS_NONFINITE = "nonfinite"   # stopped at a non-finite loss or gradient

# config.json "env" of the runs the trainer integrations write (gradlens.integrations): their run
# directories are continued by resuming the trainer, never by `gradlens record --resume`.
TRAINER_ENVS = ("transformers", "trl")

KIND_PREFERENCE = "preference"
KIND_LANGEVIN = "langevin"

# Step-table columns of preference runs (TRL names where TRL has one). The loss's own
# metrics are named in gradlens/metric_names.py, below both the loss and this module.
from ..metric_names import (  # noqa: E402  (re-exported: this module lists every column)
    LOG_PW_OVER_PL, LOSS, REWARDS_ACCURACIES, REWARDS_CHOSEN, REWARDS_MARGINS, REWARDS_REJECTED, SIGMOID_NEG_U,
    WEIGHT_CHOSEN, WEIGHT_REJECTED,
)

STEP = "step"
LR = "lr"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"
GRAD_NORM = "grad_norm"                   # ||g||, the whole gradient
GRAD_NORM_CHOSEN = "grad_norm/chosen"     # ||g_chosen||
GRAD_NORM_REJECTED = "grad_norm/rejected" # ||g_rejected||
GRAD_DOT = "grad/dot"                     # <g_chosen, g_rejected>
GRAD_COSINE = "grad/cosine"
GRAD_RATIO = "grad/ratio"                 # rho = ||g_rejected|| / ||g_chosen||
NONFINITE = "nonfinite"                   # 1 if the step's loss or gradient was not finite

# steps.csv column order of preference runs (`gradlens record` and the trainer callbacks).
PREFERENCE_STEP_COLUMNS = (
    STEP, LOSS,
    REWARDS_CHOSEN, REWARDS_REJECTED, REWARDS_MARGINS, REWARDS_ACCURACIES,
    LOGPS_CHOSEN, LOGPS_REJECTED, LR,
    GRAD_NORM, GRAD_NORM_CHOSEN, GRAD_NORM_REJECTED, GRAD_DOT, GRAD_COSINE, GRAD_RATIO,
    LOG_PW_OVER_PL, SIGMOID_NEG_U, WEIGHT_CHOSEN, WEIGHT_REJECTED, NONFINITE,
)  # fmt: skip

# Extra step columns of trainer runs whose batches carry more groups than chosen/rejected.
def group_norm_column(group: str) -> str:
    """``grad_norm/<group>``: the norm of one extra row group's gradient."""
    return f"{GRAD_NORM}/{group}"


# The split's own columns: what a trainer's log stream gains on logging steps.
GRADIENT_COLUMNS = (GRAD_NORM, GRAD_NORM_CHOSEN, GRAD_NORM_REJECTED, GRAD_DOT, GRAD_COSINE, GRAD_RATIO)


def split_columns(pair: tuple[str, str]) -> tuple[str, ...]:
    """The split's columns for a run whose two groups are ``pair`` = (first, second): ``grad_norm``,
    ``grad_norm/<first>``, ``grad_norm/<second>``, ``grad/dot``, ``grad/cosine`` and ``grad/ratio``
    (= ||g_second|| / ||g_first||). ``GRADIENT_COLUMNS`` for (chosen, rejected)."""
    first, second = pair
    return (GRAD_NORM, group_norm_column(first), group_norm_column(second), GRAD_DOT, GRAD_COSINE, GRAD_RATIO)


# config.json: the run's two groups, [first, second] (["chosen", "rejected"] when absent). layers.csv's
# CHOSEN_SQ / REJECTED_SQ columns and grad/ratio = ||g_second|| / ||g_first|| refer to these groups.
CONFIG_GROUPS = "groups"
DEFAULT_GROUPS = ("chosen", "rejected")

def group_count_column(group: str) -> str:
    """``counts/<group>``: rows of one group over the step's micro-batches (all processes where gathered)."""
    return f"counts/{group}"


# KTO: unpaired desirable and undesirable completions.
DESIRABLE = "desirable"
UNDESIRABLE = "undesirable"
KTO_GROUPS = (DESIRABLE, UNDESIRABLE)
KTO_STEP_COLUMNS = (STEP, LOSS, LR, *split_columns(KTO_GROUPS), *(group_count_column(g) for g in KTO_GROUPS), NONFINITE)

# Reward models: the chosen and the rejected side of each pair ([chosen; rejected] rows, like DPO);
# rewards/* are the model's scores here, not DPO's implicit rewards.
REWARD_MODEL_STEP_COLUMNS = (
    STEP, LOSS, LR, *GRADIENT_COLUMNS, REWARDS_CHOSEN, REWARDS_REJECTED, REWARDS_MARGINS, REWARDS_ACCURACIES, NONFINITE,
)  # fmt: skip

# Runs whose rows are sampled completions scored by an advantage (GRPO, RLOO, `record --loss grpo`):
# positive-advantage rows vs negative-advantage rows; zero-advantage rows are a third group.
POSITIVE = "positive"
NEGATIVE = "negative"
ZERO = "zero"
ADVANTAGE_GROUPS = (POSITIVE, NEGATIVE)
COUNT_POSITIVE = group_count_column(POSITIVE)  # completions with advantage > 0 in the step
COUNT_NEGATIVE = group_count_column(NEGATIVE)  # advantage < 0
COUNT_ZERO = group_count_column(ZERO)          # advantage == 0 (only KL / entropy terms reach them)
ADVANTAGE_POSITIVE_MEAN = "advantages/positive_mean"
ADVANTAGE_NEGATIVE_MEAN = "advantages/negative_mean"
PROMPT_GROUPS = "prompt_groups"                # prompts whose completions are in the step
PROMPT_GROUPS_MIXED = "prompt_groups/mixed"    # ... with both positive and negative completions
PROMPT_GROUPS_NO_SIGNAL = "prompt_groups/no_signal"  # ... whose completions all have advantage 0
POSITIVE_PER_PROMPT = "counts/positive_per_prompt"   # mean over the step's prompt groups
NEGATIVE_PER_PROMPT = "counts/negative_per_prompt"
REWARD_MEAN = "reward"                         # mean verifier / reward-function score of the step's completions
ADVANTAGE_METRIC_COLUMNS = (
    COUNT_POSITIVE, COUNT_NEGATIVE, COUNT_ZERO, ADVANTAGE_POSITIVE_MEAN, ADVANTAGE_NEGATIVE_MEAN,
    PROMPT_GROUPS, PROMPT_GROUPS_MIXED, PROMPT_GROUPS_NO_SIGNAL, POSITIVE_PER_PROMPT, NEGATIVE_PER_PROMPT,
)  # fmt: skip
# steps.csv column order of advantage runs (then grad_norm/zero, added as an extra group).
ADVANTAGE_STEP_COLUMNS = (STEP, LOSS, REWARD_MEAN, LR, *split_columns(ADVANTAGE_GROUPS), *ADVANTAGE_METRIC_COLUMNS, NONFINITE)

# steps.csv columns of a plain transformers.Trainer run (no preference pairs known).
GROUPS_STEP_COLUMNS = (STEP, LOSS, LR, *GRADIENT_COLUMNS, NONFINITE)

# A steps.csv name that is spelled differently in transformers.Trainer's logs.
TRAINER_NAMES = {LR: "learning_rate"}

# Per-row table (``ROWS``, ``--per-row``).
ROW_PAIR = "pair"
ROW_SIDE = "side"
ROW_GRAD_NORM = "grad_norm"
ROW_COLUMNS = (STEP, ROW_PAIR, ROW_SIDE, ROW_GRAD_NORM)

# evals.csv columns (all ``eval/...``); each environment reports the ones it can compute.
EVAL_LOGPS_CHOSEN = "eval/logps/chosen"        # held-out mean log p(chosen)
EVAL_LOGPS_REJECTED = "eval/logps/rejected"
EVAL_PREF_ACCURACY = "eval/pref_accuracy"      # share of held-out pairs with a positive implicit-reward margin
EVAL_TRAIN_PAIR_ACCURACY = "eval/train_pair_accuracy"  # the same on training pairs (user env without --eval-data)
EVAL_MARGIN = "eval/margin"                    # mean implicit-reward margin
EVAL_DPO_LOSS = "eval/dpo_loss"
EVAL_TRUE_REWARD = "eval/true_reward"          # ground-truth reward of samples (built-in environments)
EVAL_KL_TO_REF = "eval/kl_to_ref"
EVAL_KL_TO_OPTIMUM = "eval/kl_to_optimum"      # tabular: KL to the closed-form optimum
EVAL_OOD_MASS = "eval/ood_mass"                # tabular: probability on responses in no pair
EVAL_SAMPLE_LENGTH = "eval/sample_length"      # tiny-gpt2: mean sampled length

# summary.json keys of preference runs (`gradlens record` and the trainer integrations alike).
SUMMARY_STATUS = "status"                      # STATUS_COMPLETE or STATUS_NONFINITE
SUMMARY_MESSAGE = "message"
SUMMARY_STEPS = "steps"                        # optimizer steps asked for
SUMMARY_STEPS_LOGGED = "steps_logged"          # rows in steps.csv
SUMMARY_STOPPED_AT = "stopped_at_step"         # the non-finite step that stopped the run, else null
SUMMARY_NONFINITE_STEPS = "nonfinite_steps"
SUMMARY_SKIPPED_STEPS = "skipped_steps"        # non-finite steps whose update was skipped
SUMMARY_UNATTRIBUTED = "unattributed_parameters"  # parameters whose gradient no hook saw (not in the split)
SUMMARY_WALL_TIME = "wall_time_s"
SUMMARY_RESUMED_FROM = "resumed_from_step"
SUMMARY_FINAL = "final"                        # the last steps.csv row
SUMMARY_FINAL_EVAL = "final_eval"              # the last evals.csv row ({} without evaluations)
SUMMARY_KEYS = (
    SUMMARY_STATUS, SUMMARY_MESSAGE, SUMMARY_STEPS, SUMMARY_STEPS_LOGGED, SUMMARY_STOPPED_AT, SUMMARY_NONFINITE_STEPS,
    SUMMARY_SKIPPED_STEPS, SUMMARY_UNATTRIBUTED, SUMMARY_WALL_TIME, SUMMARY_RESUMED_FROM, SUMMARY_FINAL, SUMMARY_FINAL_EVAL,
)  # fmt: skip

# Layer-table columns (long format).
LAYER = "layer"
CHOSEN_SQ = "chosen_sq"      # ||g_chosen restricted to the layer||^2
REJECTED_SQ = "rejected_sq"
DOT = "dot"
LAYER_COLUMNS = (STEP, LAYER, CHOSEN_SQ, REJECTED_SQ, DOT)  # layers.csv, in this order
