"""Train for a wall-clock budget: the LR schedule spans the budget, not an epoch count.

A fixed epoch count suits one machine; on a slower one Lightning's `max_time` cuts the run
before the cosine decay ends (a high LR at the end costs several points), on a faster one the
budget is left unused. `TimeBudget` maps elapsed training time to the schedule instead:
linear warmup, then cosine to `min_lr_ratio`, reaching it exactly when the budget is spent;
training then stops and one validation runs, so the checkpoint's val/acc1 is the final score.

It is Lightning's `Timer` (its clock, its resume offset in `state_dict`, its stop decision
broadcast from rank 0) and the clock of the module's one LR schedule (training/lr_schedule.py):
at every batch start it reads its share of the budget and steps that schedule, which then reads
`lr_factor(progress())`. Under DDP every rank must use the same LR and stop at the same step,
but their clocks start a few milliseconds apart, so rank 0's share of the budget is broadcast at
every step as well.
"""

from __future__ import annotations

import logging
import math
import warnings
from datetime import timedelta
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer

from training.lr_schedule import warmup_cosine

log = logging.getLogger(__name__)


class TimeBudget(Timer):
    def __init__(self, minutes: float, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.01) -> None:
        """
        Args:
            minutes: training wall-clock budget, counted from the first training batch (start-up
                and sanity validation are outside it, validation during training inside).
            warmup_fraction: share of the budget spent in linear warmup.
            min_lr_ratio: the LR at the end of the budget, relative to the peak.
        """
        if minutes <= 0:
            raise ValueError(f"TimeBudget minutes must be positive, got {minutes}")
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        budget = timedelta(minutes=minutes)
        super().__init__(duration=budget, interval="step", verbose=False)
        self._budget_s = budget.total_seconds()  # Timer keeps it too, privately (as _duration)
        self.warmup_fraction = warmup_fraction
        self.min_lr_ratio = min_lr_ratio
        self._progress = 0.0  # rank 0's share of the budget at the start of the current step
        self.train_s: float | None = None  # training time when the budget stopped the run

    @property
    def budget_s(self) -> float:
        return self._budget_s

    def progress(self) -> float:
        """Share of the budget used at the start of the current step, in [0, 1]: rank 0's
        clock, the same on every rank."""
        return self._progress

    def lr_factor(self, progress: float) -> float:
        return warmup_cosine(progress, self.warmup_fraction, 1.0, self.min_lr_ratio, start=1e-3)

    def _shared_progress(self, trainer: L.Trainer) -> float:
        return trainer.strategy.broadcast(min(1.0, self.time_elapsed() / self.budget_s))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._progress = self._shared_progress(trainer)
        log.info(f"time budget: {self.budget_s / 60:g} min of training, warmup {self.warmup_fraction:.0%}, "
                 f"cosine to {self.min_lr_ratio:g} x peak")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._progress = self._shared_progress(trainer)
        with warnings.catch_warnings():
            # The LR of the step about to run is set before it, on purpose: PyTorch warns when a
            # schedule's first step comes before the optimizer's.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            for config in trainer.lr_scheduler_configs:  # the module's schedule, on this clock
                config.scheduler.step()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stopping = trainer.should_stop
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # Timer: stop when spent
        if trainer.should_stop and not stopping:
            self.train_s = self.time_elapsed()
            # Validate now, even if the config validates only every N epochs to save budget:
            # Lightning validates a stopping epoch when that epoch is a validation epoch.
            trainer.check_val_every_n_epoch = 1
            epochs = trainer.current_epoch + (batch_idx + 1) / max(1, trainer.num_training_batches)
            log.info(f"time budget spent after {epochs:.2f} epochs ({trainer.global_step} steps)")


def training_progress(trainer: L.Trainer) -> float:
    """Share of training done, in [0, 1]: the TimeBudget's when the run has one, else by steps."""
    for cb in trainer.callbacks:
        if isinstance(cb, TimeBudget):
            return cb.progress()
    total = trainer.estimated_stepping_batches
    if not total or math.isinf(total):
        return 0.0
    return min(1.0, trainer.global_step / total)
