"""Serving decides by the host and by measurement: bf16 is never timed on a CPU without bf16
instructions, int8 is served only through its accuracy guard, and decode + model threads do not
oversubscribe the cores. (The kept decision itself: tests/test_backends.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("nncf", reason="the int8 extra: pip install -e '.[int8]'")

from service_fixtures import AVX2_ONLY, bentoml_server, encode, picture, save_tiny_folder  # noqa: E402
from vit_service.artifact import MANIFEST_FILE  # noqa: E402
from vit_service.backends import load_backend  # noqa: E402
from vit_service.quantize import INT8_FILE  # noqa: E402



@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return save_tiny_folder(tmp_path / "model")


def test_bf16_is_never_timed_on_a_cpu_without_bf16_instructions(tiny_dir: Path, monkeypatch) -> None:
    """On an AVX2-only CPU no bf16 candidate runs at all: no bf16 autocast, no openvino bf16."""
    seen: list[torch.dtype] = []
    real_autocast = torch.autocast

    def spy(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True, **kw):
        if enabled:
            seen.append(dtype)
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    predictor = load_backend(tiny_dir, device="cpu", cpu=AVX2_ONLY, cache=tiny_dir.parent / "cache")
    predictor.warmup(4)
    decision = predictor.describe()["decision"]
    assert predictor.precision == "fp32" and seen == []
    assert set(decision["rates_img_s"]) == {"torch fp32", "openvino fp32"}


@pytest.fixture(scope="module")
def int8_models(int8_exports: dict[str, Path]) -> dict[str, Path]:
    """The demo run exported with --int8 (passes the guard), and the same with an int8-hostile head
    (fails it): conftest's int8_exports, shared with tests/test_int8.py."""
    return int8_exports


def test_int8_guard_at_serving(int8_models: dict[str, Path]) -> None:
    good, damaged = int8_models["good"], int8_models["damaged"]
    # explicit int8: served where the guard passes, a start-up error where it does not
    int8 = load_backend(good, precision="int8", device="cpu")
    int8.warmup(4)
    assert int8.describe()["precision"] == "int8" and int8.describe()["int8"]["agreement_top1"] >= 0.99
    with pytest.raises(ValueError, match=r"VIT_PRECISION=int8 but its int8 version agreed with fp32 on .*below the 99% guard"):
        load_backend(damaged, precision="int8", device="cpu")
    # auto: int8 is a candidate only where the guard passes
    from vit_service.artifact import ModelArtifact
    from vit_service.backends import candidates

    def offered(folder: Path) -> list[str]:
        return [c.label for c in candidates("auto", "auto", "cpu", AVX2_ONLY, ModelArtifact.read(folder))]

    assert "openvino int8" in offered(good) and "openvino int8" not in offered(damaged)
    # int8 agrees with the fp32 torch model on real images (the demo data's JPEGs, via the predictor)
    from vit_service.quantize import evaluation_images

    from vit_service.preprocessing import open_image

    artifact = ModelArtifact.read(good)
    record = artifact.int8
    images = evaluation_images(record["measured_on"], artifact.class_names)
    x = np.stack([artifact.preprocessing.to_uint8(open_image(p)).numpy() for p, _ in images])
    fp32 = load_backend(good, backend="torch", device="cpu", precision="fp32").predict_proba(x)
    assert np.mean(int8.predict_proba(x).argmax(1) == fp32.argmax(1)) == pytest.approx(record["agreement_top1"])


def test_int8_without_an_int8_model_is_a_start_up_error(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="VIT_PRECISION=int8 but the model has no int8 version .*vit-export --int8"):
        load_backend(tiny_dir, precision="int8", device="cpu")
    with pytest.raises(ValueError, match="runs on openvino"):
        load_backend(tiny_dir, backend="torch", precision="int8", device="cpu")


def test_real_server_serves_int8_and_reports_it(int8_models: dict[str, Path], tmp_path: Path) -> None:
    env = {"VIT_MODEL_TAG": "vit-good", "VIT_PRECISION": "int8"}
    with bentoml_server(int8_models["home"], tmp_path / "serve.log", env) as url:
        info = httpx.get(f"{url}/model_info", timeout=30).json()
        serving = info["serving"]
        assert serving["precision"] == "int8" and serving["backend"] == "openvino"
        recorded = json.loads((int8_models["good"] / MANIFEST_FILE).read_text())["int8"]
        for key in ("agreement_top1", "fp32_top1", "int8_top1", "images"):
            assert serving["int8"][key] == recorded[key]
        r = httpx.post(f"{url}/classify", files={"image": ("x.jpg", encode(picture(3), "JPEG"), "image/jpeg")},
                       timeout=30)
        assert r.status_code == 200 and r.json()["predictions"]


def test_real_server_refuses_to_start_int8_without_an_int8_model(int8_models: dict[str, Path], tmp_path: Path) -> None:
    """The damaged model: int8 recorded below the guard. The server must not come up serving it:
    `bentoml serve` exits before any worker starts (the check runs in its own process)."""
    env = {"VIT_MODEL_TAG": "vit-damaged", "VIT_PRECISION": "int8"}
    log = tmp_path / "serve.log"
    with pytest.raises((RuntimeError, TimeoutError)):
        with bentoml_server(int8_models["home"], log, env, ready_timeout=90):
            pass
    assert "VIT_PRECISION=int8 but its int8 version agreed with fp32" in log.read_text()


def test_threads_never_oversubscribe_the_cores(monkeypatch) -> None:
    import vit_service.serving.settings as settings

    for var in ("VIT_DECODE_THREADS", "VIT_TORCH_THREADS", "VIT_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VIT_DEVICE", "cpu")
    # Each front worker gets its share of the cores (cores / workers): a quarter decoding, the rest the model's.
    for workers, cores, decode, model in ((1, 2, 1, 1), (1, 4, 1, 3), (1, 8, 2, 6), (1, 16, 4, 12),
                                          (2, 2, 1, 1), (2, 8, 1, 3), (2, 16, 2, 6)):
        monkeypatch.setenv("VIT_WORKERS", str(workers))
        monkeypatch.setattr(settings, "host_cores", lambda c=cores: c)
        s = settings.Settings.from_env()
        assert (s.decode_threads, s.torch_threads) == (decode, model), (workers, cores)
        assert s.describe()["torch_threads"] == model
    monkeypatch.setenv("VIT_TORCH_THREADS", "2")
    assert settings.Settings.from_env().torch_threads == 2  # an explicit setting wins
