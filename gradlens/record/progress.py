"""The progress bar: step, loss, ||g_c||, ||g_r|| and the ETA (tqdm's remaining time).

Messages go through ``Progress.write`` so they do not tear the bar. The bar
writes to stderr; stdout keeps only the final report of `gradlens record`.
"""

from __future__ import annotations

import math
import sys

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
