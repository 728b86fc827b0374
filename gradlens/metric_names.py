"""Names of the per-step preference metrics a loss reports (TRL's names where TRL has one).

The loss (``gradlens.losses``) produces these values and the run format
(``gradlens.runs.schema``) stores them as columns; both import the names from
here, the lowest layer, so neither depends on the other. Nothing is imported.
"""

LOSS = "loss"
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_MARGINS = "rewards/margins"
REWARDS_ACCURACIES = "rewards/accuracies"
LOG_PW_OVER_PL = "log_pw_over_pl"         # mean log(p_w / p_l) = mean (l_w - l_l)
SIGMOID_NEG_U = "sigmoid_neg_u"           # mean sigma(-u)
WEIGHT_CHOSEN = "weights/chosen"          # mean a_w
WEIGHT_REJECTED = "weights/rejected"      # mean a_l
