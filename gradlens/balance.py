r"""Parameter-space balancing: rescale a step's chosen and rejected gradient pieces to equal norms.

DPO's gradient is the sum of two pieces, g = g_c + g_r: the chosen rows' part and
the rejected rows' part. When ‖g_r‖ ≫ ‖g_c‖ the update is mostly "push the
rejected response down". ``norm_balanced`` replaces g by

    m · (g_c / ‖g_c‖ + g_r / ‖g_r‖),    m = (‖g_c‖ + ‖g_r‖) / 2,

so both pieces count equally and the update keeps DPO's scale (the two piece
norms still add up to ‖g_c‖ + ‖g_r‖). With ``scope="per_layer"`` the norms and m
are taken per parameter tensor instead of over the whole model.

It needs **no extra backward pass**: the pieces are the ones a
``GradientRecorder`` capture already computes to report ‖g_c‖ and ‖g_r‖; the
capture only has to keep them (``rec.capture(..., keep_pieces=True)``, one
parameter-sized buffer per group) instead of freeing them. The rewrite then costs
a few passes over the gradient.

A piece with zero or non-finite norm leaves that scope's gradient as it is
(there is nothing to balance, and a non-finite step is skipped by the loop).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

Piece = tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]  # (parameter, chosen piece, rejected piece)
SCOPES = ("global", "per_layer")


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.dot(t.reshape(-1), t.reshape(-1))) for t in tensors))


def _coefficients(norm_c: float, norm_r: float) -> tuple[float, float]:
    """(c_c, c_r) with c_c·‖g_c‖ = c_r·‖g_r‖ = (‖g_c‖ + ‖g_r‖)/2; (1, 1) when there is nothing to balance."""
    if not (math.isfinite(norm_c) and math.isfinite(norm_r)) or norm_c == 0.0 or norm_r == 0.0:
        return 1.0, 1.0
    m = 0.5 * (norm_c + norm_r)
    return m / norm_c, m / norm_r


@torch.no_grad()
def rebalance_pieces(pieces: Sequence[Piece], *, scope: str = "global") -> dict[str, float]:
    """Overwrite each parameter's ``.grad`` with its rebalanced update; return the global coefficients.

    ``pieces`` must cover every parameter the optimizer will step (their sum is the
    gradient being replaced). Returns ``{"coef/chosen", "coef/rejected"}`` for the
    global scope (per-layer: the norm-weighted means are not needed, so NaN).
    """
    if scope not in SCOPES:
        raise ValueError(f"balance_scope must be one of {list(SCOPES)}, got {scope!r}")
    if scope == "global":
        c_c, c_r = _coefficients(_norm(p[1] for p in pieces), _norm(p[2] for p in pieces))
        for param, chosen, rejected in pieces:
            _write(param, c_c * chosen + c_r * rejected)
        return {"coef/chosen": c_c, "coef/rejected": c_r}
    for param, chosen, rejected in pieces:
        c_c, c_r = _coefficients(_norm([chosen]), _norm([rejected]))
        _write(param, c_c * chosen + c_r * rejected)
    return {"coef/chosen": math.nan, "coef/rejected": math.nan}


def _write(param: torch.nn.Parameter, update: torch.Tensor) -> None:
    dtype = param.grad.dtype if param.grad is not None else param.dtype
    param.grad = update.to(dtype)


def rebalance_capture(
    cap, params: Mapping[str, torch.nn.Parameter], *, balance_scope: str = "global", groups: tuple[str, str] = ("chosen", "rejected")
) -> dict[str, float]:
    """``rebalance_pieces`` on the pieces a finished capture kept (``keep_pieces=True``).

    ``params`` maps the recorder's parameter names to the parameters
    (``dict(model.named_parameters())``). Parameters the capture could not split
    (``cap.unattributed``) are refused: their gradient reached them by a path the
    hooks did not see, so no balanced update exists for them.
    """
    if cap.unattributed:
        raise ValueError(
            f"norm balancing needs every gradient split into chosen and rejected pieces, but {sorted(cap.unattributed)} "
            "could not be split (a path no module hook saw); use a loss without a parameter-space step"
        )
    chosen, rejected = cap.pieces(groups[0]), cap.pieces(groups[1])
    pieces = [(params[name], piece, rejected[name]) for name, piece in chosen.items()]
    return rebalance_pieces(pieces, scope=balance_scope)
