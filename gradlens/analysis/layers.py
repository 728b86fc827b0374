"""Per-layer attribution from a long-format layers table (step, layer,
chosen_sq, rejected_sq, dot): which layers carry the chosen and the rejected
squared norm, and which carry the imbalance between them.

The table is first pivoted into dense (step x layer) arrays, which keeps a
10^5-step, 27-layer run (2.7 million rows) a matter of numpy operations.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..runs import schema
from .finite import as_float_array


@dataclass
class LayerArrays:
    """A layers table as dense arrays; a missing (step, layer) pair is NaN."""

    steps: np.ndarray        # (T,) sorted step numbers
    names: list[str]         # (L,) layer names in order of first appearance (model order)
    chosen_sq: np.ndarray    # (T, L)
    rejected_sq: np.ndarray  # (T, L)

    def log_ratio(self) -> np.ndarray:
        """log rho per step and layer, 0.5 * log(rejected_sq / chosen_sq); non-finite where undefined."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return 0.5 * (np.log(self.rejected_sq) - np.log(self.chosen_sq))


def layer_arrays(layers: pd.DataFrame) -> LayerArrays:
    """Pivot a long layers table into (step x layer) arrays."""
    missing = {schema.STEP, schema.LAYER, schema.CHOSEN_SQ, schema.REJECTED_SQ} - set(layers.columns)
    if missing:
        raise ValueError(f"layers table lacks columns {sorted(missing)}")
    step_codes, steps = pd.factorize(layers[schema.STEP], sort=True)
    layer_codes, names = pd.factorize(layers[schema.LAYER], sort=False)
    shape = (len(steps), len(names))
    out = []
    for name in (schema.CHOSEN_SQ, schema.REJECTED_SQ):
        dense = np.full(shape, np.nan)
        dense[step_codes, layer_codes] = as_float_array(layers[name])
        out.append(dense)
    return LayerArrays(np.asarray(steps, dtype=np.float64), [str(n) for n in names], out[0], out[1])


def _row_share(values: np.ndarray) -> np.ndarray:
    """Each layer's share of the per-step total, over finite entries (NaN where undefined)."""
    finite = np.isfinite(values)
    clean = np.where(finite, values, 0.0)
    total = clean.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(finite & (total > 0), clean / total, np.nan)


def _nanmean_columns(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    total = np.where(finite, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def layer_attribution(layers: pd.DataFrame | LayerArrays) -> pd.DataFrame:
    """One row per layer (model order).

    Columns:
    - ``chosen_share`` / ``rejected_share``: the layer's share of ||g_chosen||^2 /
      ||g_rejected||^2 at a step, averaged over steps (each column sums to 1);
    - ``share_diff``: rejected_share - chosen_share (> 0: the layer carries more
      of the rejected update than of the chosen one);
    - ``imbalance``: the layer's contribution to (||g_r||^2 - ||g_c||^2) / (||g_r||^2 + ||g_c||^2)
      at a step, averaged over steps; the column sums to the run's mean
      normalised imbalance, in (-1, 1), so layers with large positive values
      carry the rejected-response domination;
    - ``imbalance_share``: ``imbalance`` divided by its sum over layers;
    - ``median_log_ratio``: median over steps of the layer's own log rho;
    - ``n_nonfinite``: non-finite chosen_sq / rejected_sq entries left out.

    Averages are over steps, not sums of squared norms, so a few early
    large-gradient steps do not decide the attribution.
    """
    arrays = layers if isinstance(layers, LayerArrays) else layer_arrays(layers)
    chosen_share = _row_share(arrays.chosen_sq)
    rejected_share = _row_share(arrays.rejected_sq)
    both = np.isfinite(arrays.chosen_sq) & np.isfinite(arrays.rejected_sq)
    c = np.where(both, arrays.chosen_sq, 0.0)
    r = np.where(both, arrays.rejected_sq, 0.0)
    total = (c + r).sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        imbalance = np.where(both & (total > 0), (r - c) / total, np.nan)
    log_ratio = arrays.log_ratio()
    log_ratio = np.where(np.isfinite(log_ratio), log_ratio, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN layer gives NaN, as it should
        median_log = np.nanmedian(log_ratio, axis=0) if log_ratio.size else np.full(len(arrays.names), np.nan)
    table = pd.DataFrame(
        {
            "layer": arrays.names,
            "chosen_share": _nanmean_columns(chosen_share),
            "rejected_share": _nanmean_columns(rejected_share),
            "imbalance": _nanmean_columns(imbalance),
            "median_log_ratio": median_log,
            "n_nonfinite": (~np.isfinite(arrays.chosen_sq)).sum(axis=0) + (~np.isfinite(arrays.rejected_sq)).sum(axis=0),
        }
    )
    table.insert(3, "share_diff", table["rejected_share"] - table["chosen_share"])
    total_imbalance = table["imbalance"].sum(skipna=True)
    table.insert(5, "imbalance_share", table["imbalance"] / total_imbalance if total_imbalance != 0 else np.nan)
    return table


def imbalance_carriers(attribution: pd.DataFrame, coverage: float = 0.8) -> list[str]:
    """The fewest layers whose ``imbalance_share`` adds up to ``coverage`` of the total,
    largest first: the layers that carry the imbalance."""
    shares = attribution[["layer", "imbalance_share"]].dropna().sort_values("imbalance_share", ascending=False)
    carriers, cumulative = [], 0.0
    for layer, share in zip(shares["layer"], shares["imbalance_share"]):
        if share <= 0 or cumulative >= coverage:
            break
        carriers.append(str(layer))
        cumulative += float(share)
    return carriers


def binned_log_ratio(arrays: LayerArrays, edges: np.ndarray) -> np.ndarray:
    """Mean log rho per layer within step bins ``[edges[i], edges[i+1])``: (L, n_bins).

    Used to draw the layer x step heatmap; finite values only, NaN for empty bins.
    """
    log_ratio = arrays.log_ratio()
    finite = np.isfinite(log_ratio)
    # Cumulative sums give every bin's sum in one subtraction, empty bins included.
    csum = np.vstack([np.zeros((1, log_ratio.shape[1])), np.cumsum(np.where(finite, log_ratio, 0.0), axis=0)])
    ccount = np.vstack([np.zeros((1, log_ratio.shape[1])), np.cumsum(finite, axis=0)])
    bounds = np.searchsorted(arrays.steps, edges, side="left")
    sums = csum[bounds[1:]] - csum[bounds[:-1]]
    counts = ccount[bounds[1:]] - ccount[bounds[:-1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan).T
