"""Fewer tokens early: train at a lower input resolution first, the full one at the end.

With 4 px patches a 16 px input is 16 tokens instead of 64 (step rates per input size:
bench/README.md, "CIFAR-10 train step: fp32 vs bf16"), and early training learns coarse features
that transfer to the full size; the ViT resamples its position embeddings to the input grid
(`VisionTransformer._pos_embed`). The batch is downscaled in the training process (antialiased
bilinear) rather than in the data pipeline, so the loader, its transform and the eval
preprocessing stay those of the full size.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from training.callbacks.time_budget import training_progress

log = logging.getLogger(__name__)


class ProgressiveResize(Callback):
    def __init__(self, schedule: list[tuple[float, int]]) -> None:
        """
        Args:
            schedule: [[progress, size], ...]: from that share of training on (time share with a
                TimeBudget callback, else step share), train at `size` px. Sizes must be
                multiples of the patch size; before the first entry the input is left as it is.
        """
        self.schedule = sorted((float(p), int(s)) for p, s in schedule)
        if not self.schedule:
            raise ValueError("ProgressiveResize needs at least one [progress, size] entry")
        self.current_size: int | None = None

    def size_at(self, progress: float) -> int | None:
        size = None
        for start, s in self.schedule:
            if progress >= start:
                size = s
        return size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        patch = getattr(getattr(pl_module, "model", None), "config", None)
        patch_size = getattr(patch, "patch_size", 1)
        bad = [s for _, s in self.schedule if s % patch_size]
        if bad:
            raise ValueError(f"ProgressiveResize sizes {bad} are not multiples of the patch size {patch_size}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        size = self.size_at(training_progress(trainer))
        if size != self.current_size:
            log.info(f"progressive resize: training at {size} px from step {trainer.global_step}")
            self.current_size = size
        if size is None or batch[0].shape[-1] == size:
            return
        if not isinstance(batch, list):
            raise TypeError(f"ProgressiveResize needs [images, labels] list batches, got {type(batch).__name__}")
        # The batch list is the object training_step receives: replace the images in place.
        batch[0] = F.interpolate(batch[0], size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)  # (B, C, size, size)
