"""`vit-train predict`: classify a folder of unlabeled images and write one row per image.

The rows (path, top-k labels and scores, or the reason a file could not be read) go to
`predictions.csv` or `predictions.jsonl` in the run folder (`trainer.log_dir`). An unreadable file
gets a row naming it and the reason; it never stops the run.
"""

from __future__ import annotations

import logging
import csv
import json
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Dataset

from training.folder_dataset import DatasetError, is_image_file
from vit_service.preprocessing import DEFAULT_MAX_PIXELS, InvalidImageError, Preprocessing, open_image

log = logging.getLogger(__name__)


class PredictFolderDataset(Dataset):
    """Every image file under root (any depth, sorted) as (eval_transform(image), index, error).

    `error` is "" for a readable image; otherwise the image is zeros and `error` says why, so the
    writer can name the file instead of the loader stopping.
    """

    def __init__(self, root: str | os.PathLike[str], preprocessing: Preprocessing,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if not os.path.isdir(root):
            raise DatasetError(f"{root}: prediction folder not found")
        self.root = str(root)
        self.paths = sorted(
            os.path.join(d, f) for d, dirs, files in os.walk(root, followlinks=True)
            for f in files if is_image_file(f) and not _hidden(d, root)
        )
        if not self.paths:
            raise DatasetError(f"{root}: no image files to predict on")
        self.preprocessing = preprocessing
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            img = open_image(self.paths[index], max_pixels=self.max_pixels,
                             draft_size=self.preprocessing.resize_size)
            return self.preprocessing(img), index, ""
        except InvalidImageError as e:
            size = self.preprocessing.image_size
            reason = str(e).removeprefix(f"{self.paths[index]}: ")  # the row names the file already
            return torch.zeros(3, size, size), index, reason  # (3, S, S) placeholder, never scored


def _hidden(folder: str, root: str | os.PathLike[str]) -> bool:
    rel = os.path.relpath(folder, root)
    return rel != "." and any(part.startswith(".") for part in Path(rel).parts)


class PredictionFileWriter(BasePredictionWriter):
    """Writes `predict_step`'s top-k per image to `<trainer.log_dir>/predictions.<format>`."""

    def __init__(self, format: Literal["csv", "jsonl"] = "csv", top_k: int = 5) -> None:
        """
        Args:
            format: csv (columns path, error, label_1, score_1, ...) or jsonl (one object a line).
            top_k: labels per image (at most 5, what `predict_step` returns).
        """
        super().__init__(write_interval="batch")
        self.format = format
        self.top_k = top_k
        self.path: Path | None = None
        self._file: Any = None
        self._csv: Any = None
        self.rows = 0
        self.unreadable: list[str] = []

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        self.path = log_dir / f"predictions{suffix}.{self.format}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", newline="")
        if self.format == "csv":
            header = ["path", "error"] + [f"{c}_{i}" for i in range(1, self.top_k + 1) for c in ("label", "score")]
            self._csv = csv.writer(self._file)
            self._csv.writerow(header)
        self.rows, self.unreadable = 0, []

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        _, indices, errors = batch
        loader = trainer.predict_dataloaders
        loader = loader[dataloader_idx] if isinstance(loader, (list, tuple)) else loader
        paths = getattr(loader.dataset, "paths", None)
        class_names = pl_module.hparams.class_names
        top = prediction["indices"][:, : self.top_k].tolist()
        scores = prediction["scores"][:, : self.top_k].tolist()
        for row, (index, error) in enumerate(zip(indices.tolist(), errors)):
            path = paths[index] if paths is not None else str(index)
            labels = [] if error else [class_names[i] for i in top[row]]
            row_scores = [] if error else [round(s, 6) for s in scores[row]]
            if error:
                self.unreadable.append(path)
            self._write(path, error, labels, row_scores)
            self.rows += 1

    def _write(self, path: str, error: str, labels: list[str], scores: list[float]) -> None:
        if self.format == "csv":
            cells = [v for pair in zip(labels, scores) for v in pair]
            self._csv.writerow([path, error] + cells + [""] * (2 * self.top_k - len(cells)))
        else:
            record: dict[str, Any] = {"path": path}
            if error:
                record["error"] = error
            else:
                record["predictions"] = [{"label": lb, "score": s} for lb, s in zip(labels, scores)]
            self._file.write(json.dumps(record) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        by = f" (checkpoint {trainer.ckpt_path}, also in config.yaml)" if trainer.ckpt_path else ""
        log.info(f"predictions: {self.rows} images -> {self.path}{by}")
        if self.unreadable:
            log.info(f"{len(self.unreadable)} unreadable file(s) (rows with an error): " + ", ".join(self.unreadable))
