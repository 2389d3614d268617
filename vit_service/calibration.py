"""Temperature scaling and the figures that say whether scores mean what they say.

A classifier's softmax score is calibrated when, of the images it scores 0.8, 80% are right.
Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides the
logits by one number T fitted on held-out labelled images by minimising the negative log-likelihood:
T > 1 softens over-confident scores, T < 1 sharpens under-confident ones (label smoothing makes
models under-confident). Dividing every logit by the same positive T keeps their order, so top-1
and the order of the top-k never change; only the scores do.

    fit_temperature(logits, labels) -> T     LBFGS on log T (T stays positive), NLL in float64
    nll(logits, labels, T)                   mean negative log-likelihood of softmax(logits / T)
    ece(probs, labels, bins=15)              expected calibration error over equal-width bins
    reliability(confidence, correct, bins)   per-bin counts, accuracy and mean confidence
    calibration_record(...), reference_record(...)   vit_artifact.json's "calibration" and "reference"
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

BINS = 15  # Guo et al.'s M = 15 equal-width confidence bins
# The fitted T is kept within these: a model near chance level "wants" T -> infinity (every score
# 1/K), where float32 softmax rounds the scores to ties and top-1 would change (seen on the barely
# trained test model: T = 160951). At T = 20 the scores are already nearly flat.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def _tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return (a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))).detach().cpu()


def nll(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    z = _tensor(logits).double() / temperature
    return float(torch.nn.functional.cross_entropy(z, _tensor(labels).long()))


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                    max_iter: int = 100) -> float:
    """The T > 0 minimising nll(logits, labels, T): LBFGS on log T from T = 1, kept within
    [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    z, y = _tensor(logits).double(), _tensor(labels).long()
    if len(y) == 0:
        raise ValueError("fitting a temperature needs labelled images; none given")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(np.clip(log_t.detach().exp(), MIN_TEMPERATURE, MAX_TEMPERATURE))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of logits / temperature in float64 (numpy)."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin over [0, 1] (bin m holds confidences in ((m-1)/M, m/M], the first also 0):
    (counts, accuracy, mean confidence); empty bins have accuracy and confidence 0."""
    confidence = np.asarray(confidence, np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    accuracy = np.bincount(which, weights=np.asarray(correct, np.float64), minlength=bins) / np.maximum(1, counts)
    mean_confidence = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(1, counts)
    return counts, accuracy, mean_confidence


def ece_of(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """ECE from top-1 confidences and whether each top-1 was right: sum over bins of
    |accuracy - mean confidence| x the bin's share of the images."""
    return ece_of_bins(*reliability(confidence, correct, bins))


def ece_of_bins(counts: np.ndarray, accuracy: np.ndarray, mean_confidence: np.ndarray) -> float:
    """ECE from `reliability`'s bins."""
    return float(np.sum(np.abs(accuracy - mean_confidence) * counts) / max(1, counts.sum()))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error of (N, K) probabilities against (N,) labels, `bins` equal-width bins."""
    probs = np.asarray(probs)
    return ece_of(probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels), bins)


SCORE_EDGES = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0]  # bins of the top-1 score in "reference"
LOW_CONFIDENCE = 0.5


def calibration_record(logits: np.ndarray, labels: np.ndarray, source: str, bins: int = BINS) -> dict[str, Any]:
    """vit_artifact.json's "calibration": T fitted on (N, K) logits and their labels, with NLL and
    ECE before (T = 1) and after."""
    temperature = fit_temperature(logits, labels)
    return {"temperature": round(temperature, 6), "images": int(len(labels)), "source": source,
            "nll_before": round(nll(logits, labels), 6), "nll_after": round(nll(logits, labels, temperature), 6),
            "ece_before": round(ece(softmax(logits), labels, bins), 6),
            "ece_after": round(ece(softmax(logits, temperature), labels, bins), 6), "bins": bins}


def reference_record(logits: np.ndarray, temperature: float = 1.0) -> dict[str, Any]:
    """vit_artifact.json's "reference": what the served (calibrated) scores look like on the export's
    images, for drift gauges to compare against: the share predicted as each class, the share of
    top-1 scores in each SCORE_EDGES bin, their mean and the share below LOW_CONFIDENCE."""
    probs = softmax(logits, temperature)
    n, k = probs.shape
    top1 = probs.max(axis=1)
    which = np.clip(np.searchsorted(SCORE_EDGES, top1, side="right") - 1, 0, len(SCORE_EDGES) - 2)
    return {"images": int(n),
            "class_shares": [round(float(s), 6) for s in np.bincount(probs.argmax(axis=1), minlength=k) / n],
            "score_edges": SCORE_EDGES,
            "score_shares": [round(float(s), 6) for s in np.bincount(which, minlength=len(SCORE_EDGES) - 1) / n],
            "mean_top1": round(float(top1.mean()), 6), "low_confidence": LOW_CONFIDENCE,
            "low_confidence_share": round(float((top1 < LOW_CONFIDENCE).mean()), 6)}


def served_calibration(record: dict[str, Any] | None, calibrated: bool, precision: str = "fp32") -> dict[str, Any]:
    """What a predictor's describe() (/model_info "serving") says about its scores: "scores"
    (calibrated or raw) and "calibration" ({"temperature", "ece_before", "ece_after"}, the int8
    model's ECEs for precision int8 where recorded), or None where the model has none."""
    if not record:
        return {"scores": "raw (the model has no calibration)", "calibration": None}
    figures = record.get("int8") if precision == "int8" and record.get("int8") else record
    return {"scores": "calibrated" if calibrated else "raw (VIT_SCORES=raw)",
            "calibration": {"temperature": record["temperature"], "ece_before": figures.get("ece_before"),
                            "ece_after": figures.get("ece_after")}}


__all__ = ["BINS", "LOW_CONFIDENCE", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "SCORE_EDGES", "calibration_record", "ece",
           "ece_of", "ece_of_bins", "fit_temperature", "nll", "reference_record", "reliability", "served_calibration", "softmax"]
