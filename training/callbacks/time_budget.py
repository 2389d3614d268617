"""Train for a wall-clock budget: the LR schedule spans the budget, not an epoch count.

A fixed epoch count suits one machine; on a slower one Lightning's `max_time` cuts the run
before the cosine decay ends (a high LR at the end costs several points), on a faster one the
budget is left unused. `TimeBudget` maps elapsed training time to the schedule instead:
linear warmup, then cosine to `min_lr_ratio`, reaching it exactly when the budget is spent;
training then stops and one validation runs, so the checkpoint's val/acc1 is the final score.

Under DDP every rank must use the same LR and stop at the same step (a rank that stops first
leaves the others waiting in an all-reduce forever), but their clocks start a few milliseconds
apart: rank 0's progress is broadcast to all ranks at every step, as Lightning's own `Timer`
callback broadcasts its stop decision.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class TimeBudget(Callback):
    def __init__(self, minutes: float, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.01) -> None:
        """
        Args:
            minutes: training wall-clock budget, counted from the first training batch (start-up,
                sanity validation and the final validation are outside it).
            warmup_fraction: share of the budget spent in linear warmup.
            min_lr_ratio: the LR at the end of the budget, relative to the peak.
        """
        if minutes <= 0:
            raise ValueError(f"TimeBudget minutes must be positive, got {minutes}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.budget_s = minutes * 60
        self.warmup_fraction = warmup_fraction
        self.min_lr_ratio = min_lr_ratio
        self._start: float | None = None
        self._base_lrs: list[float] = []
        self._resume_used_s = 0.0
        self._progress = 0.0  # rank 0's share of the budget at the start of the current step
        self.train_s: float | None = None  # training time when the budget stopped the run

    def clock(self) -> float:
        return time.monotonic()

    def elapsed_share(self) -> float:
        """This process's share of the budget used, in [0, 1]."""
        if self._start is None:
            return 0.0
        return min(1.0, (self.clock() - self._start) / self.budget_s)

    def progress(self) -> float:
        """Share of the budget used at the start of the current step, in [0, 1]: rank 0's
        clock, the same on every rank."""
        return self._progress

    def lr_factor(self, progress: float) -> float:
        if progress < self.warmup_fraction:
            return max(progress / self.warmup_fraction, 1e-3)
        t = (progress - self.warmup_fraction) / (1 - self.warmup_fraction)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Peak LRs as the module configured them (after batch-size scaling); its own per-step
        # scheduler keeps stepping, but this callback sets the LR before every optimizer step.
        self._base_lrs = [g.get("initial_lr", g["lr"]) for opt in trainer.optimizers for g in opt.param_groups]
        self._start = self.clock() - self._resume_used_s
        self._progress = trainer.strategy.broadcast(self.elapsed_share())
        print(f"time budget: {self.budget_s / 60:g} min of training, warmup {self.warmup_fraction:.0%}, "
              f"cosine to {self.min_lr_ratio:g} x peak", flush=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._progress = trainer.strategy.broadcast(self.elapsed_share())
        factor = self.lr_factor(self._progress)
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        for group, base in zip(groups, self._base_lrs):
            group["lr"] = base * factor

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        spent = trainer.strategy.broadcast(self.elapsed_share() >= 1.0)
        if spent and not trainer.should_stop:
            trainer.should_stop = True
            self.train_s = self.clock() - self._start
            # Validate now, even if the config validates only every N epochs to save budget:
            # Lightning validates a stopping epoch when that epoch is a validation epoch.
            trainer.check_val_every_n_epoch = 1
            print(f"time budget spent after {trainer.current_epoch + (batch_idx + 1) / max(1, trainer.num_training_batches):.2f}"
                  f" epochs ({trainer.global_step} steps)", flush=True)

    def state_dict(self) -> dict[str, Any]:
        used = (self.clock() - self._start) if self._start is not None else 0.0
        return {"used_s": self.train_s if self.train_s is not None else used, "train_s": self.train_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run continues the same budget instead of starting a new one.
        self._resume_used_s = float(state_dict.get("used_s", 0.0))



def training_progress(trainer: L.Trainer) -> float:
    """Share of training done, in [0, 1]: the TimeBudget's when the run has one, else by steps."""
    for cb in trainer.callbacks:
        if isinstance(cb, TimeBudget):
            return cb.progress()
    total = trainer.estimated_stepping_batches
    if not total or math.isinf(total):
        return 0.0
    return min(1.0, trainer.global_step / total)
