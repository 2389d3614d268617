"""The service's other configurations, each a real `bentoml serve`: a deliberately slow start
with two workers, bad settings. The default configuration is tested in depth in test_service.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from service_fixtures import BIN, REPO, bentoml_server, classify, encode, picture, poll
from service_fixtures import store  # noqa: F401  (session fixture)
from bench.local_server import free_port


def no_server_errors(log: Path) -> None:
    text = log.read_text()
    assert "status=500" not in text and "Traceback" not in text, text[-4000:]


# ------------------------------------------------------------- slow start, two workers

@pytest.fixture(scope="module")
def gated_server(store, tmp_path_factory: pytest.TempPathFactory):
    """Two in-process workers whose warm-up waits for a file (tests/gated_service.py); yielded as
    soon as the server answers /livez."""
    home, _ = store
    folder = tmp_path_factory.mktemp("gated")
    env = {"VIT_WORKERS": "2", "VIT_DECODE_THREADS": "1",
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
    assert (info["workers"], info["decode_threads"]) == (2, 1)


# The batch-queue latency limit (503 "overloaded") is tested deterministically, on a fake clock
# with a held forward pass, in test_serving_decisions.py (the batcher, and InProcessModel's 503);
# a burst of real requests against a 1 ms limit only shows it when the machine happens to be slow.


# ------------------------------------------------------------------------------ bad settings

# Each way `bentoml serve` stops: a VIT_* value settings.py refuses, the key file (auth.py), the
# model check before any worker starts (backends.check_servable). Where two cases take the same
# way, the second is slow here (a failing `bentoml serve` is ~10 s of imports) and its message is
# checked in-process below (test_refusals_name_the_problem_in_process).


@pytest.mark.parametrize("name, value, message", [
    ("VIT_WORKERS", "0", "VIT_WORKERS must be at least 1, got 0"),
    pytest.param("VIT_DEVICE", "tpu", "VIT_DEVICE must be auto, cpu, cuda or cuda:N, got 'tpu'", marks=pytest.mark.slow),
    pytest.param("VIT_MAX_BATCH_SIZE", "abc", "VIT_MAX_BATCH_SIZE must be an integer, got 'abc'", marks=pytest.mark.slow),
    ("VIT_API_KEY_FILE", "{empty}", "VIT_API_KEY_FILE {empty}: holds no key (one key a line)"),
    ("VIT_PRECISION", "int8", "cannot serve vit-classifier:latest: VIT_PRECISION=int8 but the model has no int8 version"),
    pytest.param("VIT_BACKEND", "onnxruntime", "cannot serve vit-classifier:latest: VIT_BACKEND must be one of auto, "
                 "torch, openvino, got 'onnxruntime' (onnxruntime serving was retired", marks=pytest.mark.slow),
])
def test_bad_setting_or_unservable_model_stops_serve_with_one_line(store, tmp_path, name, value, message):
    """`bentoml serve` exits non-zero at once, before any worker starts, printing one line that
    names the variable or the model's problem: no traceback, no worker restarted forever."""
    home, _ = store
    empty = tmp_path / "keys"
    empty.write_text("# no key yet\n")
    value, message = value.format(empty=empty), message.format(empty=empty)
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true", name: value}
    out = subprocess.run([str(BIN / "bentoml"), "serve", "vit_service.serving.service:ViTClassifier",
                          "--host", "127.0.0.1", "--port", str(free_port())],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    printed = (out.stdout + out.stderr).strip()
    assert out.returncode != 0
    assert printed.splitlines()[-1].startswith(f"vit-service: {message}"), printed[-2000:]
    assert "Traceback" not in printed and "Started" not in printed, printed[-2000:]


@pytest.mark.parametrize("name, value, message", [
    ("VIT_DEVICE", "tpu", "VIT_DEVICE must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("VIT_MAX_BATCH_SIZE", "abc", "VIT_MAX_BATCH_SIZE must be an integer, got 'abc'"),
    ("VIT_BACKEND", "onnxruntime", "VIT_BACKEND must be one of auto, torch, openvino, got 'onnxruntime' "
                                   "(onnxruntime serving was retired"),
])
def test_refusals_name_the_problem_in_process(store, name, value, message):
    """The messages of the cases above that are slow here, from the code `bentoml serve` runs:
    Settings.from_env (what service.py reads at import) and check_servable (the model check)."""
    from vit_service.backends import check_servable
    from vit_service.serving.settings import Settings

    home, tag = store
    with pytest.raises(ValueError) as refused:
        settings = Settings.from_env({name: value})
        check_servable(home / "models" / Path(tag.replace(":", "/")), settings.backend, settings.precision)
    assert str(refused.value).startswith(message)
