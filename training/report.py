"""Plots and tables about a run, written into the run's own folder (`trainer.log_dir`).

- `EvaluationReport`: after `vit-train validate` / `vit-train test`, `<log_dir>/report-<stage>/`
  holds the normalized confusion matrix (the most confused classes when there are many), per-class
  precision / recall / F1 / support as CSV and markdown, the most confused pairs, a grid of the
  worst misclassified images, and calibration (ECE and a reliability diagram, reliability.csv; with
  `--report.temperature T`, the T vit-export fitted, the diagram after it beside the checkpoint's),
  indexed by README.md. ECE and its bins are vit_service/calibration.py's, the ones vit-export records.
- `TrainingCurves`: at the end of `fit`, `<log_dir>/training_curves.png`: loss, val top-1 and LR
  against the step.

Metrics are torchmetrics' (synchronised across DDP processes), the confidences are gathered from
every process; the worst-images grid holds each process's own worst. Plots are matplotlib's (Agg, no display needed).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassConfusionMatrix, MulticlassF1Score, MulticlassPrecision,
                                         MulticlassRecall)

from vit_service.calibration import ece_of_bins, reliability

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _run_folder(trainer: L.Trainer) -> Path:
    # The first logger's folder (e.g. runs/demo/csv/version_3), else default_root_dir: where
    # Lightning itself puts this run's files, whatever --trainer.default_root_dir says.
    # Call it on every process: `trainer.log_dir` is a collective (broadcast) under DDP.
    return Path(trainer.log_dir or trainer.default_root_dir)


class EvaluationReport(Callback):
    """Writes the evaluation report after `validate` and `test` (not during `fit`)."""

    def __init__(self, max_matrix_classes: int = 20, worst_images: int = 16, top_pairs: int = 20,
                 calibration_bins: int = 15, temperature: float | None = None) -> None:
        """
        Args:
            max_matrix_classes: above this many classes, the confusion matrix shows the most confused ones.
            worst_images: how many of the most confident mistakes the image grid shows.
            top_pairs: how many (true, predicted) pairs `confused_pairs.csv` lists.
            calibration_bins: equal-width confidence bins for ECE and the reliability diagram.
            temperature: the temperature vit-export fitted (vit_artifact.json's calibration.temperature):
                the report then also shows ECE and the reliability diagram of softmax(logits / T).
                Fit on other images than these, or the "after" flatters.
        """
        if temperature is not None and not temperature > 0:
            raise ValueError(f"report.temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.max_matrix_classes = max_matrix_classes
        self.worst_images = worst_images
        self.top_pairs = top_pairs
        self.calibration_bins = calibration_bins
        self.metrics: MetricCollection | None = None
        self._worst: list[tuple[float, int, int, np.ndarray]] = []
        self._confidence: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING) and not trainer.sanity_checking

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer):
            return
        k = int(pl_module.hparams.num_classes)
        self.metrics = MetricCollection({
            "confusion": MulticlassConfusionMatrix(k),
            "precision": MulticlassPrecision(k, average=None),
            "recall": MulticlassRecall(k, average=None),
            "f1": MulticlassF1Score(k, average=None),
        }).to(pl_module.device)
        self._worst, self._confidence, self._correct, self._calibrated = [], [], [], []

    def _batch(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any) -> None:
        if self.metrics is None or not self._active(trainer) or not isinstance(outputs, dict):
            return
        logits, targets = outputs["logits"].float(), outputs["targets"]
        probs = logits.softmax(dim=-1)  # (B, K)
        self.metrics.update(probs, targets)
        confidence, predicted = probs.max(dim=-1)
        self._confidence.append(confidence.cpu())
        self._correct.append((predicted == targets).cpu())
        if self.temperature:  # the same top-1 (T > 0 keeps the order), its calibrated score
            self._calibrated.append((logits / self.temperature).softmax(dim=-1).max(dim=-1).values.cpu())
        wrong = (predicted != targets).nonzero().flatten().tolist()
        images = batch[0]
        for i in wrong:  # keep the most confident mistakes, with their pixels
            self._worst.append((float(confidence[i]), int(targets[i]), int(predicted[i]),
                                _to_uint8(images[i], pl_module.hparams.preprocessing)))
        self._worst = sorted(self._worst, key=lambda t: -t[0])[: self.worst_images]

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.metrics is None or not self._active(trainer):
            return
        results = {k: v.cpu() for k, v in self.metrics.compute().items()}  # synced over processes
        self.metrics = None
        folder = _run_folder(trainer)  # on every process: Lightning broadcasts it
        confidence, correct = (_gather(trainer, pl_module, torch.cat(c)) for c in (self._confidence, self._correct))
        calibrated = _gather(trainer, pl_module, torch.cat(self._calibrated)) if self.temperature else None
        if trainer.is_global_zero:
            out = folder / f"report-{stage}"
            write_report(out, results, list(pl_module.hparams.class_names), self._worst, confidence.numpy(),
                         correct.numpy(), self.max_matrix_classes, self.top_pairs, self.calibration_bins,
                         checkpoint=trainer.ckpt_path,  # the file evaluated (None: the model in memory)
                         temperature=self.temperature,
                         calibrated_confidence=None if calibrated is None else calibrated.numpy())
            log.info(f"evaluation report: {out / 'README.md'}")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(trainer, pl_module, outputs, batch)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(trainer, pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, pl_module, "test")


def _gather(trainer: L.Trainer, pl_module: L.LightningModule, x: torch.Tensor) -> torch.Tensor:
    """`x` (N,) of every process, concatenated (all_gather wants one length: padded, then cut)."""
    if trainer.world_size == 1:
        return x
    lengths = trainer.strategy.all_gather(torch.tensor([len(x)], device=pl_module.device)).flatten().tolist()
    padded = torch.zeros(max(lengths), dtype=x.dtype, device=pl_module.device)
    padded[:len(x)] = x.to(pl_module.device)
    every = trainer.strategy.all_gather(padded).cpu()  # (world, max length)
    return torch.cat([every[i, :n] for i, n in enumerate(lengths)])


def _to_uint8(image: torch.Tensor, preprocessing: dict[str, Any] | None) -> np.ndarray:
    """(3, S, S) normalised -> (S, S, 3) uint8, undoing the eval transform's mean/std."""
    pre = preprocessing or {}
    mean = torch.tensor(pre.get("mean", (0.485, 0.456, 0.406)), device=image.device).view(3, 1, 1)
    std = torch.tensor(pre.get("std", (0.229, 0.224, 0.225)), device=image.device).view(3, 1, 1)
    x = (image.float() * std + mean).clamp(0, 1) * 255
    return x.round().byte().permute(1, 2, 0).cpu().numpy()  # (S, S, 3)


def most_confused_classes(confusion: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n classes with the most mistakes (as true or as predicted class), sorted."""
    errors = confusion - np.diag(np.diag(confusion))
    score = errors.sum(0) + errors.sum(1)
    return np.sort(np.argsort(-score, kind="stable")[:n])


def write_report(out: Path, results: dict[str, torch.Tensor], class_names: list[str],
                 worst: list[tuple[float, int, int, np.ndarray]], confidence: np.ndarray, correct: np.ndarray,
                 max_matrix_classes: int = 20, top_pairs: int = 20, bins: int = 15,
                 checkpoint: str | None = None, temperature: float | None = None,
                 calibrated_confidence: np.ndarray | None = None) -> Path:
    """The report's files in `out`. `confidence` and `correct`: each image's top-1 score and whether
    top-1 was right; with `temperature`, `calibrated_confidence` is the top-1 of softmax(logits / T)."""
    out.mkdir(parents=True, exist_ok=True)
    confusion = results["confusion"].numpy().astype(np.int64)  # (K, K) rows: true, columns: predicted
    support = confusion.sum(1)
    K = len(class_names)
    rows = [{"class": class_names[i], "precision": float(results["precision"][i]),
             "recall": float(results["recall"][i]), "f1": float(results["f1"][i]), "support": int(support[i])}
            for i in range(K)]
    with open(out / "per_class.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    errors = confusion - np.diag(np.diag(confusion))
    order = np.argsort(-errors, axis=None, kind="stable")[:top_pairs]
    pairs = [{"true": class_names[t], "predicted": class_names[p], "count": int(errors[t, p]),
              "share_of_true": float(errors[t, p] / max(1, support[t]))}
             for t, p in zip(*np.unravel_index(order, errors.shape)) if errors[t, p] > 0]
    with open(out / "confused_pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["true", "predicted", "count", "share_of_true"])
        writer.writeheader()
        writer.writerows(pairs)

    accuracy = float(np.trace(confusion) / max(1, confusion.sum()))
    panels = {"checkpoint's scores": reliability(confidence, correct, bins)}
    if temperature is not None and calibrated_confidence is not None:
        panels[f"after T = {temperature:.3g}"] = reliability(calibrated_confidence, correct, bins)
    eces = [ece_of_bins(*b) for b in panels.values()]
    _write_reliability_csv(out / "reliability.csv", panels, bins)
    shown = _plot_confusion(out / "confusion_matrix.png", confusion, class_names, max_matrix_classes)
    _plot_reliability(out / "reliability.png", panels, eces)
    _plot_worst(out / "worst_misclassified.png", worst, class_names)
    summary = {"checkpoint": str(checkpoint) if checkpoint else None,
               "images": int(confusion.sum()), "accuracy": accuracy, "ece": eces[0],
               **({"temperature": temperature, "ece_calibrated": eces[1]} if len(eces) > 1 else {}),
               "macro_f1": float(np.mean([r["f1"] for r in rows])), "num_classes": K,
               "confusion_matrix_classes": [class_names[i] for i in shown]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_markdown(out / "README.md", summary, rows, pairs, len(worst), len(shown) < K)
    return out


def _plot_confusion(path: Path, confusion: np.ndarray, class_names: list[str], max_classes: int) -> np.ndarray:
    plt = _pyplot()
    K = len(class_names)
    shown = np.arange(K) if K <= max_classes else most_confused_classes(confusion, max_classes)
    # Normalised over each true class's full row, so a subset's rows keep their real rates.
    rates = confusion / np.maximum(1, confusion.sum(1, keepdims=True))
    sub = rates[np.ix_(shown, shown)]
    n = len(shown)
    side = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(sub, vmin=0, vmax=1, cmap="Blues")
    names = [class_names[i] for i in shown]
    ax.set_xticks(range(n), names, rotation=90 if n > 8 else 45, ha="right" if n <= 8 else "center")
    ax.set_yticks(range(n), names)
    if n <= 25:
        for (t, p), v in np.ndenumerate(sub):
            ax.text(p, t, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    title = "confusion matrix (row-normalised)"
    if n < K:
        title += f"\n{n} most confused of {K} classes"
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return shown


def _write_reliability_csv(path: Path, panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], bins: int) -> None:
    """One row per (scores, bin): the bin's edges, images, accuracy and mean confidence."""
    edges = np.linspace(0, 1, bins + 1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scores", "lower", "upper", "images", "accuracy", "confidence"])
        for name, (counts, acc, conf) in panels.items():
            for b in range(bins):
                writer.writerow([name, f"{edges[b]:.4f}", f"{edges[b + 1]:.4f}", int(counts[b]),
                                 f"{acc[b]:.6f}", f"{conf[b]:.6f}"])


def _plot_reliability(path: Path, panels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                      eces: list[float]) -> None:
    """Per bin an accuracy bar and a black tick at the mean confidence, the gap between them hatched:
    red where the scores claim more than the accuracy (over-confident), orange where less. The hatch
    has no fill, so the accuracy bar keeps its colour to its full height: the old translucent gap bar
    covered it, and an under-confident model's blue seemed to end at the confidence."""
    plt = _pyplot()
    n = len(panels)
    fig, axes = plt.subplots(2, n, figsize=(max(7, 5 * n), 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True,
                             squeeze=False)
    for col, ((name, (counts, acc, conf)), ece) in enumerate(zip(panels.items(), eces)):
        bins = len(counts)
        centres = (np.arange(bins) + 0.5) / bins
        filled = counts > 0
        x, a, c = centres[filled], acc[filled], conf[filled]
        ax, ax2 = axes[0, col], axes[1, col]
        ax.bar(x, a, width=1 / bins, color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")
        over, under = c > a, c <= a
        ax.bar(x[over], (c - a)[over], bottom=a[over], width=1 / bins, color="none", edgecolor="red",
               hatch="///", linewidth=0.5,
               label="over-confident: score above accuracy" if over.any() else "_nolegend_")
        ax.bar(x[under], (a - c)[under], bottom=c[under], width=1 / bins, color="none", edgecolor="darkorange",
               hatch="\\\\", linewidth=0.5,
               label="under-confident: score below accuracy" if under.any() else "_nolegend_")
        ax.hlines(c, x - 0.5 / bins, x + 0.5 / bins, colors="black", linewidth=2.5, label="mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {ece:.3f}")
        ax2.bar(centres, counts, width=1 / bins, color="grey")
        ax2.set_xlabel("confidence (top-1 score)")
        ax2.set_ylabel("images")
    legend: dict[str, Any] = {}  # one legend above the panels, never over a bar
    for ax in axes[0]:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.suptitle("reliability diagram")
    fig.legend(list(legend.values()), list(legend.keys()), loc="upper center", bbox_to_anchor=(0.5, 0.95),
               ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_worst(path: Path, worst: list[tuple[float, int, int, np.ndarray]], class_names: list[str]) -> None:
    plt = _pyplot()
    cols = 4
    rows = max(1, math.ceil(len(worst) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.4, rows * 2.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (score, true, pred, pixels) in zip(axes.flat, worst):
        ax.imshow(pixels)
        ax.set_title(f"true {class_names[true]}\npred {class_names[pred]} {score:.2f}", fontsize=8)
    if not worst:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle("most confident mistakes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_markdown(path: Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                    pairs: list[dict[str, Any]], n_worst: int, subset: bool) -> None:
    lines = [
        "# Evaluation report", "",
        f"Checkpoint: `{summary['checkpoint'] or 'the model in memory'}`", "",
        f"{summary['images']} images, {summary['num_classes']} classes: top-1 {summary['accuracy']:.4f}, "
        f"macro F1 {summary['macro_f1']:.4f}, ECE {summary['ece']:.4f}"
        + (f" (after T = {summary['temperature']:.3g}: {summary['ece_calibrated']:.4f})" if "temperature" in summary
           else "") + ".", "",
        "![confusion matrix](confusion_matrix.png)" + (" (the most confused classes)" if subset else ""), "",
        "## Per class (per_class.csv)", "",
        "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
        *[f"| {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |" for r in rows],
        "", "## Most confused pairs (confused_pairs.csv)", "",
        "| true | predicted | count | share of true |", "|---|---|---|---|",
        *[f"| {p['true']} | {p['predicted']} | {p['count']} | {p['share_of_true']:.3f} |" for p in pairs],
        "", f"## Worst misclassified ({n_worst} most confident mistakes)", "",
        "![worst misclassified](worst_misclassified.png)", "",
        "## Calibration", "",
        "Per bin of top-1 score: the blue bar is the accuracy, the black tick the mean score, the hatched "
        "gap between them the miscalibration (reliability.csv holds the figures)"
        + ("; right, the same images after the temperature." if "temperature" in summary else "."), "",
        "![reliability diagram](reliability.png)", "",
    ]
    path.write_text("\n".join(lines))


class TrainingCurves(Callback):
    """At the end of `fit`: loss, val top-1 and learning rate against the step, as one PNG."""

    def __init__(self, filename: str = "training_curves.png") -> None:
        self.filename = filename
        self.train: list[tuple[int, float, float]] = []  # (step, loss, lr)
        self.val: list[tuple[int, float, float]] = []  # (step, loss, top-1)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train, self.val = [], []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or not trainer.optimizers:
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.train.append((trainer.global_step, float(loss), float(lr)))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Epoch-level metrics are reduced by now.
        m = trainer.callback_metrics
        if trainer.sanity_checking or "val/acc1" not in m:
            return
        self.val.append((trainer.global_step, float(m.get("val/loss", float("nan"))), float(m["val/acc1"])))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = _run_folder(trainer)  # on every process: Lightning broadcasts it
        if not trainer.is_global_zero or not self.train:
            return
        path = folder / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_training_curves(path, self.train, self.val)
        log.info(f"training curves: {path}")


def plot_training_curves(path: Path, train: list[tuple[int, float, float]], val: list[tuple[int, float, float]]) -> None:
    plt = _pyplot()
    steps, loss, lr = (np.array(c) for c in zip(*train))
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    ax_loss.plot(steps, loss, alpha=0.35, label="train loss (step)")
    if len(loss) >= 10:  # a running mean makes the trend readable
        w = max(2, len(loss) // 20)
        ax_loss.plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), label=f"train loss (mean of {w})")
    if val:
        vs, vl, va = (np.array(c) for c in zip(*val))
        ax_loss.plot(vs, vl, "o-", label="val loss")
        ax_acc.plot(vs, va, "o-", color="tab:green")
        ax_acc.set_ylim(0, 1.02)
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_acc.set_ylabel("val top-1")
    ax_lr.plot(steps, lr, color="tab:purple")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["EvaluationReport", "TrainingCurves", "write_report", "plot_training_curves", "most_confused_classes"]
