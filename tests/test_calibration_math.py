"""vit_service/calibration.py's arithmetic on its own, against hand values and torch: the float64
softmax, the reliability bins, ECE from bins, the records written into vit_artifact.json and what
/model_info says of them. (Fitting T, ECE against torchmetrics and the backends applying T:
tests/test_calibration.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from vit_service.calibration import (BINS, LOW_CONFIDENCE, MIN_TEMPERATURE, SCORE_EDGES, calibration_record, ece,
                                     ece_of, ece_of_bins, fit_temperature, nll, reference_record, reliability,
                                     served_calibration, softmax)


def test_softmax_is_torchs_in_float64_row_by_row_even_far_apart() -> None:
    logits = np.array([[1000.0, 999.0, 990.0], [0.0, -1.0, 2.0], [-1000.0, -1001.0, -1000.5]], np.float32)
    for t in (1.0, 0.5, 3.0):
        got = softmax(logits, t)
        assert got.dtype == np.float64
        expected = torch.from_numpy(logits).double().div(t).softmax(dim=1).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(softmax(logits), softmax(logits, 1.0))  # T = 1 by default


def test_reliability_bins_are_right_closed_and_the_first_holds_zero() -> None:
    confidence = np.array([0.0, 1 / 15, 0.1, 0.5, 0.5, 1.0])
    correct = np.array([1, 0, 1, 1, 0, 1])
    counts, accuracy, mean_confidence = reliability(confidence, correct)
    assert BINS == 15 and counts.tolist() == [2, 1] + [0] * 5 + [2] + [0] * 6 + [1]
    assert accuracy[[0, 1, 7, 14]].tolist() == [0.5, 1.0, 0.5, 1.0] and accuracy.sum() == 3.0  # empty bins: 0
    np.testing.assert_allclose(mean_confidence[[0, 1, 7, 14]], [1 / 30, 0.1, 0.5, 1.0], rtol=1e-15)
    assert mean_confidence.sum() == pytest.approx(1 / 30 + 0.1 + 0.5 + 1.0)
    counts, accuracy, _ = reliability([0.2, 0.7], [1, 1], bins=2)  # bins (0, 0.5] and (0.5, 1]
    assert counts.tolist() == [1, 1] and accuracy.tolist() == [1.0, 1.0]
    # a float32 score is binned by its exact value: float32(1/15) is a little above 1/15, so bin 1
    # (in float32 arithmetic 15 x it rounds to 1.0 and would fall into bin 0)
    assert reliability(np.float32([1 / 15]), [1])[0].tolist() == [0, 1] + [0] * 13


def test_ece_from_bins_weights_each_gap_by_its_share() -> None:
    counts = np.array([2, 0, 6])
    accuracy = np.array([0.5, 0.0, 1.0])
    confidence = np.array([0.25, 0.0, 0.75])
    assert ece_of_bins(counts, accuracy, confidence) == pytest.approx((2 * 0.25 + 6 * 0.25) / 8)
    assert ece_of_bins(np.zeros(3), np.zeros(3), np.zeros(3)) == 0.0  # no images: 0, not a division by zero
    assert ece_of_bins(np.array([1]), np.array([1.0]), np.array([0.5])) == 0.5  # one image: its own gap
    assert ece_of([0.9, 0.9, 0.3, 0.3], [1, 0, 1, 1], bins=2) == pytest.approx((2 * 0.4 + 2 * 0.7) / 4)
    # the bins asked for: 2 bins pool 0.9 with 0.6 and 0.3 with 0.2; 15 keep each apart
    assert ece_of([0.9, 0.6, 0.3, 0.2], [1, 0, 1, 0], bins=2) == pytest.approx(0.25)
    assert ece_of([0.9, 0.6, 0.3, 0.2], [1, 0, 1, 0]) == pytest.approx((0.1 + 0.6 + 0.7 + 0.2) / 4)
    probs = np.array([[0.9, 0.1], [0.4, 0.6]])  # top-1 0.9 right, 0.6 wrong
    assert ece(probs, [0, 0], bins=2) == pytest.approx(0.25) and ece(probs, [0, 0]) == pytest.approx(0.35)


def test_calibration_record_holds_t_and_the_figures_before_and_after() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(400, 5)) * 3).astype(np.float32)
    labels = np.where(rng.random(400) < 0.6, logits.argmax(1), rng.integers(0, 5, 400))
    record = calibration_record(logits, labels, "val/")
    t = fit_temperature(logits, labels)
    assert set(record) == {"temperature", "images", "source", "nll_before", "nll_after", "ece_before", "ece_after",
                           "bins"}
    assert record["temperature"] == round(t, 6) and record["temperature"] != 1.0
    assert (record["images"], record["source"], record["bins"]) == (400, "val/", 15)

    def oracle_nll(temperature: float) -> float:
        return float(torch.nn.functional.cross_entropy(torch.from_numpy(logits).double() / temperature,
                                                       torch.from_numpy(labels)))

    def oracle_ece(temperature: float) -> float:
        probs = torch.from_numpy(logits).double().div(temperature).softmax(1).float()
        return float(MulticlassCalibrationError(5, n_bins=15, norm="l1")(probs, torch.from_numpy(labels)))

    assert record["nll_before"] == pytest.approx(oracle_nll(1.0), abs=1e-6)
    assert record["nll_after"] == pytest.approx(oracle_nll(t), abs=1e-6) and record["nll_after"] < record["nll_before"]
    assert record["ece_before"] == pytest.approx(oracle_ece(1.0), abs=1e-5)
    assert record["ece_after"] == pytest.approx(oracle_ece(t), abs=1e-5)
    ten = calibration_record(logits, labels, "val/", bins=10)
    assert ten["bins"] == 10 and ten["ece_before"] != record["ece_before"]
    for rec in (record, ten):  # six decimals
        assert all(v == round(v, 6) for v in rec.values() if isinstance(v, float)), rec
    unrounded = ece(softmax(logits, t), labels, 10)  # (torchmetrics agrees with it to 1e-5, below)
    assert unrounded != round(unrounded, 6) and ten["ece_after"] == round(unrounded, 6)
    probs = torch.from_numpy(logits).double().softmax(1).float()
    assert ten["ece_before"] == pytest.approx(float(MulticlassCalibrationError(5, n_bins=10, norm="l1")(
        probs, torch.from_numpy(labels))), abs=1e-5)
    probs = torch.from_numpy(logits).double().div(t).softmax(1).float()
    assert ten["ece_after"] == pytest.approx(float(MulticlassCalibrationError(5, n_bins=10, norm="l1")(
        probs, torch.from_numpy(labels))), abs=1e-5)


def test_reference_record_by_hand() -> None:
    # five classes; top-1 scores 0.2 (all equal: on an edge, so the bin above it), 1.0 (the last
    # bin, closed), e^3 / (e^3 + 4) = 0.834 and e^2 / (e^2 + 4) = 0.649
    logits = np.array([[0, 0, 0, 0, 0], [1000, 0, 0, 0, 0], [3, 0, 0, 0, 0], [0, 2, 0, 0, 0]], np.float64)
    top1 = [0.2, 1.0, math.exp(3) / (math.exp(3) + 4), math.exp(2) / (math.exp(2) + 4)]
    record = reference_record(logits)
    assert record == {
        "images": 4,
        "class_shares": [0.75, 0.25, 0.0, 0.0, 0.0],
        "score_edges": [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0],
        "score_shares": [0.0, 0.25, 0.0, 0.25, 0.25, 0.25],
        "mean_top1": round(sum(top1) / 4, 6),
        "low_confidence": 0.5,
        "low_confidence_share": 0.25,
    }
    assert SCORE_EDGES == record["score_edges"] and LOW_CONFIDENCE == 0.5
    assert reference_record(logits, 1.0) == record  # T = 1 by default
    thirds = reference_record(np.array([[5.0, 0.0], [0.0, 5.0], [0.0, 0.0]]))  # top-1: 0.993, 0.993, 0.5
    assert thirds["class_shares"] == [0.666667, 0.333333]  # six decimals (a tie goes to the first class)
    assert thirds["score_shares"] == [0.0, 0.0, 0.333333, 0.0, 0.0, 0.666667]
    assert thirds["low_confidence_share"] == 0.0  # 0.5 is not below LOW_CONFIDENCE
    tenth = reference_record(np.zeros((2, 10)))  # ten classes: top-1 0.1, the first bin; the upper bins empty
    assert tenth["score_shares"] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0] and tenth["low_confidence_share"] == 1.0
    one_low = reference_record(np.array([[0.0] * 10, [20.0] + [0.0] * 9, [20.0] + [0.0] * 9]))
    assert one_low["low_confidence_share"] == 0.333333
    assert reference_record(logits * 2, 2.0) == record  # the scores of logits / T


def test_served_calibration_says_what_the_scores_are() -> None:
    record = {"temperature": 1.7, "ece_before": 0.2, "ece_after": 0.05, "int8": {"ece_before": 0.3, "ece_after": 0.06}}
    assert served_calibration(None, True) == {"scores": "raw (the model has no calibration)", "calibration": None}
    assert served_calibration({}, True)["calibration"] is None
    assert served_calibration(record, True) == {"scores": "calibrated", "calibration": {
        "temperature": 1.7, "ece_before": 0.2, "ece_after": 0.05}}
    assert served_calibration(record, False)["scores"] == "raw (VIT_SCORES=raw)"
    assert served_calibration(record, True, "int8")["calibration"] == {"temperature": 1.7, "ece_before": 0.3,
                                                                       "ece_after": 0.06}
    assert served_calibration(record, True, "bf16")["calibration"]["ece_after"] == 0.05
    no_int8 = {k: v for k, v in record.items() if k != "int8"}
    assert served_calibration(no_int8, True, "int8")["calibration"]["ece_after"] == 0.05  # the fp32 figures


def test_fitting_takes_tensors_and_refuses_no_labels() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 4)) * 4
    labels = rng.integers(0, 4, 300)
    from_numpy = fit_temperature(logits, labels)
    assert fit_temperature(torch.from_numpy(logits).requires_grad_(), torch.from_numpy(labels)) == from_numpy
    assert nll(torch.from_numpy(logits), torch.from_numpy(labels)) == nll(logits, labels)
    # labels that always follow the (tiny) logits: the NLL falls as T -> 0; T stops at its lower bound
    sure = np.eye(4)[rng.integers(0, 4, 200)] * 0.01
    assert fit_temperature(sure, sure.argmax(1)) == MIN_TEMPERATURE == 0.05
    with pytest.raises(ValueError, match="^fitting a temperature needs labelled images; none given$"):
        fit_temperature(np.zeros((0, 4)), np.zeros(0))
