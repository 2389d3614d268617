"""Prediction drift, measured by the service: recent predictions against the validation reference.

The exported model carries its validation reference (vit_artifact.json "reference", written by
vit-export): the share of validation images predicted as each class, and how their top-1 scores
fall into a few bins. Each worker keeps a bounded window of its most recent predictions (class,
top-1 score) and, once the window holds enough of them to judge, sets Prometheus gauges: the
population stability index (PSI) of the predicted classes and of the score bins against the
reference, the mean top-1 score and the share below the low-confidence threshold. PSI reads
< 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted (docs/serving.md has an alert rule). A model
exported without a reference has no drift gauges: /model_info says why.

The window keeps running counts, so one prediction costs O(1) to add and the gauges O(classes +
bins) to recompute; no per-request allocation beyond the deque entry.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

MIN_TO_JUDGE = 200  # predictions in the window before any gauge is set (fewer: noise, not drift)
EPSILON = 1e-4  # floor for an empty share in PSI (the log of 0 is undefined)


def psi(actual: np.ndarray, expected: np.ndarray) -> float:
    """Population stability index of two distributions (shares summing to 1): sum (a - e) ln(a / e)."""
    a, e = np.maximum(actual, EPSILON), np.maximum(expected, EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftWindow:
    """The last `size` predictions of one model version against its reference."""

    def __init__(self, reference: dict[str, Any], size: int) -> None:
        self.reference = reference
        self.size = size
        self.expected_classes = np.asarray(reference["class_shares"], np.float64)
        self.expected_scores = np.asarray(reference["score_shares"], np.float64)
        self.edges = np.asarray(reference["score_edges"], np.float64)
        self.low = float(reference["low_confidence"])
        self._window: deque[tuple[int, int, float]] = deque()  # (class, score bin, top-1 score)
        self._classes = np.zeros(len(self.expected_classes), np.int64)
        self._bins = np.zeros(len(self.expected_scores), np.int64)
        self._score_sum = 0.0
        self._low = 0

    def observe(self, probs: np.ndarray) -> None:
        """(B, K) probabilities of one request: each image's top-1 class and score enter the window."""
        top = probs.argmax(axis=1)  # (B,)
        scores = probs[np.arange(len(probs)), top]  # (B,)
        bins = np.clip(np.searchsorted(self.edges, scores, side="right") - 1, 0, len(self._bins) - 1)
        for c, b, s in zip(top.tolist(), bins.tolist(), scores.tolist()):
            self._window.append((c, b, s))
            self._add(c, b, s, +1)
            if len(self._window) > self.size:
                self._add(*self._window.popleft(), -1)

    def _add(self, c: int, b: int, s: float, sign: int) -> None:
        self._classes[c] += sign
        self._bins[b] += sign
        self._score_sum += sign * s
        self._low += sign * (s < self.low)

    @property
    def count(self) -> int:
        return len(self._window)

    def judgeable(self) -> bool:
        return self.count >= min(MIN_TO_JUDGE, self.size)

    def gauges(self) -> dict[str, float] | None:
        """{class_psi, score_psi, mean_top1, low_confidence_ratio}, or None while the window is too small."""
        if not self.judgeable():
            return None
        n = self.count
        return {"class_psi": psi(self._classes / n, self.expected_classes),
                "score_psi": psi(self._bins / n, self.expected_scores),
                "mean_top1": self._score_sum / n, "low_confidence_ratio": self._low / n}
