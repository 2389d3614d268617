"""Prediction drift (vit_service/serving/drift.py) on given predictions: PSI against an independent
computation, the bounded window, nothing judged below its minimum, in-distribution vs shifted
streams. The gauges through a real server: tests/test_service.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vit_service.serving.drift import MIN_TO_JUDGE, DriftWindow, psi

EDGES = [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0]


def reference(class_shares: list[float], score_shares: list[float]) -> dict:
    return {"images": 1000, "class_shares": class_shares, "score_edges": EDGES, "score_shares": score_shares,
            "mean_top1": 0.8, "low_confidence": 0.5, "low_confidence_share": 0.1}


def one_hot_probs(classes: list[int], score: float, k: int) -> np.ndarray:
    """(B, k): the given class at `score`, the rest shared evenly."""
    probs = np.full((len(classes), k), (1 - score) / (k - 1))
    probs[np.arange(len(classes)), classes] = score
    return probs


def test_psi_is_the_textbook_sum() -> None:
    a, e = np.array([0.5, 0.3, 0.2]), np.array([0.4, 0.4, 0.2])
    expected = sum((x - y) * math.log(x / y) for x, y in zip(a, e))
    assert psi(a, e) == pytest.approx(expected, abs=1e-12)
    assert psi(e, e) == 0.0
    assert psi(np.array([1.0, 0.0]), np.array([0.5, 0.5])) > 0.25  # an empty share is floored, not infinite


def test_window_is_bounded_and_counts_only_what_it_holds() -> None:
    window = DriftWindow(reference([0.5, 0.5], [0, 0, 0, 0, 0.5, 0.5]), size=300)
    window.observe(one_hot_probs([0] * 500, 0.95, 2))  # 500 of class 0, then 300 of class 1
    window.observe(one_hot_probs([1] * 300, 0.95, 2))
    assert window.count == 300
    gauges = window.gauges()
    assert gauges is not None
    assert gauges["class_psi"] == pytest.approx(psi(np.array([0.0, 1.0]), np.array([0.5, 0.5])))
    assert gauges["mean_top1"] == pytest.approx(0.95) and gauges["low_confidence_ratio"] == 0.0


def test_nothing_is_judged_before_the_window_holds_enough() -> None:
    window = DriftWindow(reference([0.25] * 4, [0, 0, 0, 0, 0.5, 0.5]), size=1000)
    window.observe(one_hot_probs([0, 1, 2, 3] * ((MIN_TO_JUDGE - 4) // 4), 0.95, 4))
    assert window.count < MIN_TO_JUDGE and window.gauges() is None
    window.observe(one_hot_probs([0, 1, 2, 3], 0.95, 4))
    assert window.count == MIN_TO_JUDGE and window.gauges() is not None


def test_in_distribution_is_stable_and_a_shifted_stream_is_not() -> None:
    rng = np.random.default_rng(0)
    k = 10
    ref = reference([0.1] * k, [0.05, 0.05, 0.1, 0.2, 0.2, 0.4])
    window = DriftWindow(ref, size=1000)
    classes = rng.integers(0, k, 1000).tolist()
    scores = rng.choice([0.1, 0.3, 0.5, 0.7, 0.85, 0.95], size=1000, p=ref["score_shares"])
    for c, s in zip(classes, scores):
        window.observe(one_hot_probs([c], float(s), k))
    stable = window.gauges()
    assert stable["class_psi"] < 0.1 and stable["score_psi"] < 0.1
    # The same model fed images of two classes only, at low confidence.
    window.observe(one_hot_probs(rng.integers(0, 2, 1000).tolist(), 0.3, k))
    shifted = window.gauges()
    assert shifted["class_psi"] > 0.25 and shifted["score_psi"] > 0.25
    assert shifted["mean_top1"] < stable["mean_top1"] - 0.3 and shifted["low_confidence_ratio"] == 1.0
