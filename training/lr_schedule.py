"""The one LR shape: linear warmup, then cosine decay to a floor.

One LambdaLR (training/module.py) follows it on one of two clocks: optimizer steps (Lightning steps
the schedule after each one), or, when the run has a TimeBudget, the share of the budget spent
(the budget steps the same schedule at the start of every batch, after reading its clock).
"""

from __future__ import annotations

import math


def warmup_cosine(t: float, warmup: float, total: float, min_ratio: float, start: float = 0.0) -> float:
    """LR multiplier at `t` of `total` (steps, or shares of a time budget: any one unit): linear
    from `start` to 1 over the first `warmup`, then cosine decay to `min_ratio` at `total`."""
    if t < warmup:
        return start + (1 - start) * t / warmup
    span = total - warmup
    progress = (t - warmup) / span if span > 0 else 1.0
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


__all__ = ["warmup_cosine"]
