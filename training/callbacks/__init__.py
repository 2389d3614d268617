"""Lightning callbacks for short, time-boxed training recipes (configs/cifar10_30min.yaml)."""

from training.callbacks.progressive_resize import ProgressiveResize
from training.callbacks.time_budget import TimeBudget, training_progress

__all__ = ["ProgressiveResize", "TimeBudget", "training_progress"]
