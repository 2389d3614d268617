"""A plain progress line per epoch (or every N steps) for logs that are not a terminal.

A tqdm bar written to a file or a CI log is one unreadable line of carriage returns; a line per
epoch with the key metrics is what a log reader wants, so when these lines are on and stderr (where
the bar goes) is not a terminal either, Lightning's bar is switched off.

Epochs are numbered from 0, as Lightning numbers them everywhere (its bar, `epoch` in
metrics.csv and in checkpoints, `best-epoch{epoch:03d}` file names): the line for the 23rd of 30
epochs says `epoch 22/29`, and its checkpoint is `best-epoch022-...`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.utilities import rank_zero_only

from training.module import dataset_size

log = logging.getLogger(__name__)

SHOWN_METRICS = ("train/loss_epoch", "train/acc1", "val/loss", "val/acc1", "val/acc5")


class _NoAdvertisement(logging.Filter):
    """Lightning logs "💡 Tip: ... try installing litlogger ..." (a hosted service) at every start
    without a LitLogger: an advertisement, not information about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def hide_lightning_tips() -> None:
    """Drops those tips from the loggers Lightning's rank_zero_info writes to."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoAdvertisement())


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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # The bar's frames written to a log are carriage-return garbage, and its last frame is
        # dumped at the end; our lines say the same thing readably.
        if self._enabled() and not sys.stderr.isatty():
            for callback in trainer.callbacks:
                if isinstance(callback, ProgressBar):  # TQDMProgressBar or RichProgressBar
                    callback.disable()

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
        seen, total = metrics.get("val/images"), dataset_size(trainer.val_dataloaders)
        if seen is not None and total and int(seen) < total:  # --trainer.limit_val_batches: say so beside it
            shown += f"  (val on {int(seen)} of {total} images)"
        last = f"/{trainer.max_epochs - 1}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self._print(trainer, f"epoch {trainer.current_epoch}{last}  step {trainer.global_step}  {shown}")

    def _print(self, trainer: L.Trainer, text: str) -> None:
        log.info(f"[{time.monotonic() - self._started:7.1f} s] {text}")
