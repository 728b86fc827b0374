"""What a run says while it runs: the progress bar, the precision note, and quiet libraries.

The bar shows step, loss, ||g_c||, ||g_r|| and the ETA (tqdm's remaining time).
Messages go through ``Progress.write`` so they do not tear the bar. The bar
writes to stderr; stdout keeps only the final report of `gradlens record`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Iterator

from tqdm.auto import tqdm


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


class Progress:
    def __init__(self, total: int, *, initial: int = 0, desc: str = "", enabled: bool = True):
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            mininterval=0.25,
            bar_format="{desc}: step {n_fmt}/{total_fmt} |{bar:20}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
        )

    def step(self, loss: float, grad_chosen: float, grad_rejected: float) -> None:
        self.advance(f"loss={_fmt(loss)} |g_c|={_fmt(grad_chosen)} |g_r|={_fmt(grad_rejected)}")

    def advance(self, postfix: str = "") -> None:
        """One step done; ``postfix`` is shown after the timing."""
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(1)

    def write(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def precision_note(dtype: str, autocast: str | None = None) -> str:
    """What training in 16 bits does to the recorded numbers (empty for float32 without autocast)."""
    low = [f"{dtype} weights"] if dtype in ("bfloat16", "float16", "bf16", "fp16") else []
    low += [f"{autocast} autocast"] if autocast else []
    if not low:
        return ""
    return (
        f"note: {' and '.join(low)}: every activation is rounded to about 3 significant digits, so the gradient "
        "differs from a float32 run's by up to a few percent (measured on small models: group norms within 4e-2 of "
        "float64). The recorder accumulates in float32: the chosen and rejected parts still add up to the gradient "
        "this run computed (within 2e-3). Compare runs at the same precision."
    )


@contextlib.contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """--quiet: no loading bars or info lines from transformers and datasets (errors still show); restored after."""
    if not quiet:
        yield
        return
    import transformers

    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        data_verbosity, data_bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
        if datasets is not None:
            datasets.logging.set_verbosity(data_verbosity)
            if data_bars:
                datasets.enable_progress_bars()
