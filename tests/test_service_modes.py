"""The service's other configurations, each a real `bentoml serve`: split mode (front + model
service), a deliberately slow start with two workers and a tiny latency limit, bad settings.

The default configuration (in-process mode) is tested in depth in test_service.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest

from service_fixtures import (BIN, REPO, assert_matches, batch_histogram, bentoml_server, check_predictions, classify, classify_all_at_once,
                              encode, picture, poll)
from service_fixtures import reference, store  # noqa: F401  (session fixtures)
from vit_service.serving.local_server import free_port


def no_server_errors(log: Path) -> None:
    text = log.read_text()
    assert "status=500" not in text and "Traceback" not in text, text[-4000:]


# ------------------------------------------------------------------------------ split mode

@pytest.fixture(scope="module")
def split_server(store, tmp_path_factory: pytest.TempPathFactory):
    home, _ = store
    log = tmp_path_factory.mktemp("split") / "serve.log"
    env = {"VIT_MODE": "split", "VIT_PRECISION": "fp32", "VIT_MAX_LATENCY_MS": "20000"}
    with bentoml_server(home, log, env=env) as url:
        yield url, log
        no_server_errors(log)


def test_split_mode_serves_through_the_model_service(split_server, tmp_path, reference):
    url, _ = split_server
    image = tmp_path / "a.jpg"
    image.write_bytes(encode(picture(200), "JPEG"))
    with bentoml.SyncHTTPClient(url) as client:
        one = client.classify(image=image, top_k=2)
        check_predictions(one["predictions"], k=2)
        assert_matches(one["predictions"], reference(image.read_bytes()))
        batch = client.classify_batch(images=[image, image])
        assert len(batch["results"]) == 2
        assert client.model_info()["serving"]["mode"] == "split"
    r = httpx.post(f"{url}/classify", files={"image": ("a.jpg", image.read_bytes(), "image/jpeg")}, timeout=60)
    stages = set(re.findall(r"(\w+);dur=", r.headers["server-timing"]))
    assert "hop" in stages and "queue" not in stages, stages  # the model is behind an HTTP hop


def test_split_mode_batches_concurrent_requests(split_server, reference):
    url, _ = split_server
    images = [encode(picture(210 + i), "JPEG") for i in range(24)]
    expected = [int(np.argmax(reference(d))) for d in images]
    with httpx.Client(base_url=url, timeout=60) as c:
        batches0, images0, _ = batch_histogram(c)
    responses = classify_all_at_once(url, images)
    assert [r.status_code for r in responses] == [200] * len(images)
    assert [r.json()["predictions"][0]["index"] for r in responses] == expected
    with httpx.Client(base_url=url, timeout=60) as c:
        batches1, images1, _ = batch_histogram(c)
    assert images1 - images0 == len(images)
    assert batches1 - batches0 < len(images), "every request got its own forward pass"


def test_sustained_concurrency_keeps_one_model_connection(split_server):
    """Past 100 calls BentoML's dependency client would swap sessions and drop calls in flight
    (retried, but wasted work); the service keeps one session, so nothing is dropped."""
    url, log = split_server
    data = encode(picture(90), "JPEG")

    def one(_: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as c:
            return sum(classify(c, data).status_code == 200 for _ in range(8))

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(one, range(16))) == 128
    assert "model call failed" not in log.read_text()


# ------------------------------------------------------------- slow start, two workers

@pytest.fixture(scope="module")
def gated_server(store, tmp_path_factory: pytest.TempPathFactory):
    """Two in-process workers whose warm-up waits for a file (tests/gated_service.py); yielded as
    soon as the server answers /livez."""
    home, _ = store
    folder = tmp_path_factory.mktemp("gated")
    env = {"VIT_MODE": "inprocess", "VIT_WORKERS": "2", "VIT_DECODE_THREADS": "1",
           "WARMUP_GATE": str(folder / "go"), "PYTHONPATH": str(REPO / "tests")}
    with bentoml_server(home, folder / "serve.log", env=env, target="gated_service:ViTClassifier",
                        ready_path="/livez") as url:
        yield url, folder / "serve.log", folder / "go"


def test_readyz_is_503_until_the_model_is_warm(gated_server):
    url, log, gate = gated_server
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/readyz").status_code == 503  # up, but the warm-up is held at the gate
        r = classify(c, encode(picture(5), "PNG"), name="a.png", ctype="image/png")
        assert r.status_code == 503 and "warming up" in r.json()["error"]
        gate.touch()
        assert poll(lambda: c.get("/readyz").status_code, until=lambda status: status == 200, attempts=2000) == 200
    # VIT_WORKERS=2: two worker processes, each loading and warming its own model.
    def warmed_workers() -> set[str]:
        return set(re.findall(r"\[entry_service:vit_classifier:(\d+)\] model vit-classifier:\w+ ready on", log.read_text()))

    assert poll(warmed_workers, until=lambda workers: len(workers) == 2, attempts=2000) == {"1", "2"}
    with httpx.Client(base_url=url, timeout=30) as c:
        info = c.get("/model_info").json()["serving"]
    assert (info["workers"], info["decode_threads"], info["mode"]) == (2, 1, "inprocess")


# The batch-queue latency limit (503 "overloaded") is tested deterministically, on a fake clock
# with a held forward pass, in test_serving_decisions.py (the batcher, and InProcessModel's 503);
# a burst of real requests against a 1 ms limit only shows it when the machine happens to be slow.


# ------------------------------------------------------------------------------ bad settings

@pytest.mark.parametrize("name, value", [("VIT_WORKERS", "0"), ("VIT_DEVICE", "tpu")])
def test_bad_setting_is_a_clear_startup_error(store, tmp_path, name, value):
    """`bentoml serve` exits at once with a message naming the variable (no traceback needed)."""
    home, _ = store
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", name: value}
    out = subprocess.run([str(BIN / "bentoml"), "serve", "vit_service.serving.service:ViTClassifier",
                          "--host", "127.0.0.1", "--port", str(free_port())],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert re.search(rf"{name} must be .*{re.escape(value)}", out.stdout + out.stderr), (out.stdout + out.stderr)[-2000:]
