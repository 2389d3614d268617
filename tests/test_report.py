"""Training curves after `vit-train fit` and the evaluation report after `vit-train validate`,
through the real CLI; the report's tables and plots on hand-made results with many classes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import demo_config, eval_logits, run_cli_in_process
from training.report import most_confused_classes, write_report


def _one(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def test_fit_writes_training_curves_beside_the_logs(trained_run: Path) -> None:
    curves = _one(list(trained_run.rglob("training_curves.png")))
    # Beside the logs: the first logger's folder (CSV), whatever the run layout.
    assert (curves.parent / "metrics.csv").is_file()
    with Image.open(curves) as img:
        assert img.width > 300 and img.height > 300


def test_validate_writes_the_evaluation_report(trained_run: Path, demo_data: Path, tmp_path: Path) -> None:
    # Its own run folder: the shared training run's folder stays as fit left it.
    config = demo_config(tmp_path, demo_data)
    r = run_cli_in_process("vit-train", "validate", "--config", str(config), "--report.temperature", "2.0",
                           "--ckpt_path", str(trained_run / "checkpoints" / "last.ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = _one(list(tmp_path.rglob("report-validate")))
    assert f"evaluation report: {report / 'README.md'}" in r.stdout
    for name in ("confusion_matrix.png", "reliability.png", "worst_misclassified.png"):
        with Image.open(report / name) as img:
            assert img.width > 200
    with open(report / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == sorted(p.name for p in (demo_data / "val").iterdir())
    assert sum(int(r["support"]) for r in rows) == len(list((demo_data / "val").rglob("*.jpg")))
    summary = json.loads((report / "summary.json").read_text())
    # The report's accuracy is the one the module logs (same images, same model).
    metrics = _one(list(report.parent.glob("metrics.csv")))
    logged = [row for row in csv.DictReader(open(metrics)) if row.get("val/acc1")]
    assert abs(summary["accuracy"] - float(logged[-1]["val/acc1"])) < 1e-6
    # Per-class precision / recall / F1 and ECE against a hand computation (numpy) from the same
    # checkpoint's logits over the val folder: counts of true and false positives, 15 equal-width
    # confidence bins, ECE = sum over bins of |accuracy - mean confidence| x share of images.
    logits, y = eval_logits(trained_run / "checkpoints" / "last.ckpt")
    probs = logits.softmax(-1).numpy()
    truth, pred = y.numpy(), probs.argmax(1)
    for k, row in enumerate(rows):
        tp = int(((pred == k) & (truth == k)).sum())
        predicted, actual = int((pred == k).sum()), int((truth == k).sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert int(row["support"]) == actual
        assert float(row["precision"]) == pytest.approx(precision, abs=1e-6), row
        assert float(row["recall"]) == pytest.approx(recall, abs=1e-6), row
        assert float(row["f1"]) == pytest.approx(f1, abs=1e-6), row
    confidence, correct = probs.max(1), (pred == truth).astype(float)
    bins = np.minimum((confidence * 15).astype(int), 14)
    ece = sum(abs(correct[bins == b].mean() - confidence[bins == b].mean()) * (bins == b).mean()
              for b in range(15) if (bins == b).any())
    assert summary["ece"] == pytest.approx(ece, abs=1e-5)
    assert summary["ece"] > 0.01  # this barely trained model is not calibrated: a real value, not 0
    # --report.temperature: the same images' scores after T (here 2.0), beside the checkpoint's
    calibrated = (logits / 2.0).softmax(-1).numpy().max(1)
    bins = np.minimum((calibrated * 15).astype(int), 14)
    ece_after = sum(abs(correct[bins == b].mean() - calibrated[bins == b].mean()) * (bins == b).mean()
                    for b in range(15) if (bins == b).any())
    assert summary["temperature"] == 2.0 and summary["ece_calibrated"] == pytest.approx(ece_after, abs=1e-5)
    with open(report / "reliability.csv") as f:
        table = list(csv.DictReader(f))
    assert {row["scores"] for row in table} == {"checkpoint's scores", "after T = 2"}
    assert sum(int(row["images"]) for row in table if row["scores"] == "after T = 2") == len(truth)
    assert summary["macro_f1"] == pytest.approx(np.mean([float(r["f1"]) for r in rows]), abs=1e-6)
    markdown = (report / "README.md").read_text()
    assert "| class | precision | recall | F1 | support |" in markdown and "ECE" in markdown


def test_reliability_shows_accuracy_and_confidence_of_an_underconfident_model(tmp_path: Path) -> None:
    """An under-confident model (label smoothing): scores ~0.6 where 90% are right. The table gives
    both heights per bin; the diagram draws the gap hatched above the accuracy bar, not over it."""
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.55, 0.65, 1000)
    correct = rng.random(1000) < 0.9
    K = 4
    results = {"confusion": torch.tensor(np.diag([250] * K)), "precision": torch.ones(K), "recall": torch.ones(K),
               "f1": torch.ones(K)}
    out = write_report(tmp_path / "r", results, [f"c{i}" for i in range(K)], [], confidence, correct)
    with open(out / "reliability.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["images"])]
    assert {r["scores"] for r in rows} == {"checkpoint's scores"}  # no temperature: the one diagram
    for r in rows:
        assert float(r["accuracy"]) > 0.8 and 0.55 < float(r["confidence"]) < 0.65
    summary = json.loads((out / "summary.json").read_text())
    weights = np.array([int(r["images"]) for r in rows]) / 1000
    gaps = np.array([float(r["accuracy"]) - float(r["confidence"]) for r in rows])
    assert summary["ece"] == pytest.approx(float((weights * np.abs(gaps)).sum()), abs=1e-5)
    with Image.open(out / "reliability.png") as img:
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    blue = np.array([31, 119, 180])  # tab:blue: the accuracy bars are there in full
    assert (np.abs(pixels - blue).sum(1) < 30).sum() > 500


def test_report_tables_and_most_confused_subset(tmp_path: Path) -> None:
    K = 60
    names = [f"class{i:02d}" for i in range(K)]
    confusion = np.diag(np.full(K, 10))
    confusion[3, 7] = 6  # the pairs that matter, among 60 classes
    confusion[7, 3] = 2
    confusion[40, 41] = 4
    results = {"confusion": torch.tensor(confusion),
               "precision": torch.rand(K), "recall": torch.rand(K), "f1": torch.rand(K), "ece": torch.tensor(0.1)}
    worst = [(0.9, 3, 7, np.zeros((16, 16, 3), np.uint8))]
    out = write_report(tmp_path / "r", results, names, worst, np.random.rand(100), np.random.rand(100) > 0.5,
                       max_matrix_classes=20)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["confusion_matrix_classes"]) == 20
    assert {"class03", "class07", "class40", "class41"} <= set(summary["confusion_matrix_classes"])
    with open(out / "confused_pairs.csv") as f:
        pairs = list(csv.DictReader(f))
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("class03", "class07", "6"), ("class40", "class41", "4"), ("class07", "class03", "2")]
    assert list(most_confused_classes(confusion, 3)) == [3, 7, 40]  # ties keep class order
