"""Prediction drift (vit_service/serving/drift.py) on given predictions: PSI against an independent
computation, the bounded window, nothing judged below its minimum, in-distribution vs shifted
streams; then the gauges through a real server, and a model without a reference."""

from __future__ import annotations

import math
from pathlib import Path

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


# ------------------------------------------------------------------ through a real server

@pytest.fixture(scope="module")
def drift_server(tmp_path_factory: pytest.TempPathFactory):
    """The tiny model with a validation reference made from 400 pictures of the kind the test
    then sends (the model's own predictions on them), served with a 300-prediction window."""
    import json

    from service_fixtures import bentoml_server, copy_tiny_model, encode, picture
    from vit_service.backends import load_backend
    from vit_service.preprocessing import decode_image

    home = tmp_path_factory.mktemp("drift_home")
    tag = copy_tiny_model(home)
    name, version = tag.split(":")
    folder = home / "models" / name / version  # the store's layout (this process's BentoML may have another home)
    predictor = load_backend(folder, backend="torch", device="cpu", precision="fp32")
    pre = predictor.preprocessing
    pixels = np.stack([pre.to_uint8(decode_image(encode(picture(1000 + i), "JPEG"), draft_size=pre.resize_size)).numpy()
                       for i in range(400)])
    probs = predictor.predict_proba(pixels)  # (400, 4)
    top, scores = probs.argmax(1), probs.max(1)
    reference = {"images": 400, "class_shares": (np.bincount(top, minlength=4) / 400).tolist(),
                 "score_edges": EDGES, "score_shares": (np.histogram(scores, EDGES)[0] / 400).tolist(),
                 "mean_top1": float(scores.mean()), "low_confidence": 0.5,
                 "low_confidence_share": float((scores < 0.5).mean())}
    manifest = Path(folder) / "vit_artifact.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "reference": reference}))
    log = tmp_path_factory.mktemp("drift") / "serve.log"
    env = {"VIT_PRECISION": "fp32", "VIT_WORKERS": "1", "VIT_DRIFT_WINDOW": "300"}
    with bentoml_server(home, log, env=env) as url:
        yield url, tag


def _drift_gauges(url: str, tag: str) -> dict[str, float]:
    import re

    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = {}
    for name in ("vit_drift_window_predictions", "vit_drift_class_psi", "vit_drift_top1_score_psi",
                 "vit_drift_top1_score_mean", "vit_drift_low_confidence_ratio"):
        m = re.search(rf'^{name}\{{[^}}]*model="{re.escape(tag)}"[^}}]*\}} (\S+)$', text, re.M)
        if m:
            found[name] = float(m.group(1))
    return found


def _send(url: str, images: list[bytes]) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(0, len(images), 16):
            files = [("images", (f"{j}.jpg", data, "image/jpeg")) for j, data in enumerate(images[i:i + 16])]
            assert client.post("/classify_batch", files=files).status_code == 200


def test_drift_gauges_on_a_real_server(drift_server):
    import httpx

    from service_fixtures import encode, picture

    url, tag = drift_server
    _send(url, [encode(picture(2000 + i), "JPEG") for i in range(100)])
    few = _drift_gauges(url, tag)
    assert few.get("vit_drift_window_predictions") == 100 and "vit_drift_class_psi" not in few  # too few to judge
    _send(url, [encode(picture(2100 + i), "JPEG") for i in range(200)])
    stable = _drift_gauges(url, tag)
    assert stable["vit_drift_window_predictions"] == 300
    assert stable["vit_drift_class_psi"] < 0.1 and stable["vit_drift_top1_score_psi"] < 0.1, stable
    info = httpx.get(f"{url}/model_info", timeout=30).json()["drift"]
    assert info["available"] and info["window"] == 300 and info["current"]["class_psi"] == pytest.approx(
        stable["vit_drift_class_psi"])
    # Another source: flat grey frames, all one thing to the model.
    from PIL import Image

    _send(url, [encode(Image.new("RGB", (96, 72), (int(g),) * 3), "JPEG") for g in np.linspace(60, 200, 300)])
    shifted = _drift_gauges(url, tag)
    assert shifted["vit_drift_class_psi"] > 0.25, shifted
    assert abs(shifted["vit_drift_top1_score_mean"] - stable["vit_drift_top1_score_mean"]) > 0.01


def test_a_model_without_a_reference_serves_without_drift(tiny_model_server):
    import httpx

    from service_fixtures import encode, picture

    url, _ = tiny_model_server  # the tiny model as saved without vit-export: no validation reference
    _send(url, [encode(picture(i), "JPEG") for i in range(20)])
    info = httpx.get(f"{url}/model_info", timeout=30).json()["drift"]
    assert info["available"] is False and "without a validation reference" in info["reason"]
    assert "vit_drift_" not in httpx.get(f"{url}/metrics", timeout=30).text.replace("# HELP vit_drift_", "").replace(
        "# TYPE vit_drift_", "")
