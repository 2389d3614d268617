"""A plain progress line per epoch (or every N steps) for logs that are not a terminal.

A tqdm bar written to a file or a CI log is one unreadable line of carriage returns; a line per
epoch with the key metrics is what a log reader wants.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

SHOWN_METRICS = ("train/loss_epoch", "train/acc1", "val/loss", "val/acc1", "val/acc5")


class ProgressLog(Callback):
    def __init__(self, when: Literal["auto", "always", "never"] = "auto", every_n_steps: int = 0) -> None:
        """
        Args:
            when: auto prints only when stdout is not a terminal (files, CI logs, pipes).
            every_n_steps: also print a line every N optimizer steps (0: once per epoch only).
        """
        self.when = when
        self.every_n_steps = every_n_steps
        self._started = time.monotonic()

    def _enabled(self) -> bool:
        return self.when == "always" or (self.when == "auto" and not sys.stdout.isatty())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and self._enabled():
            loss = trainer.callback_metrics.get("train/loss_step")
            extra = f"  train/loss {float(loss):.4f}" if loss is not None else ""
            self._print(trainer, f"step {step}{extra}")

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after the epoch's validation, so val metrics are the current epoch's.
        if not self._enabled() or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(f"{k.replace('_epoch', '')} {float(metrics[k]):.4f}" for k in SHOWN_METRICS if k in metrics)
        self._print(trainer, f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  step {trainer.global_step}  {shown}")

    def _print(self, trainer: L.Trainer, text: str) -> None:
        log.info(f"[{time.monotonic() - self._started:7.1f} s] {text}")
