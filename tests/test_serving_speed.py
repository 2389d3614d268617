"""Serving decides by the host and by measurement (issue 16): bf16 is never timed on a CPU without
bf16 instructions, VIT_BACKEND=auto gets an ONNX graph without `vit-export --onnx`, int8 is served
only through its accuracy guard, and decode + model threads do not oversubscribe the cores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="the onnx extra: pip install -e '.[onnx]'")

from conftest import run_cli  # noqa: E402
from service_fixtures import bentoml_server, build_tiny_model, encode, picture  # noqa: E402
from vit_service.artifact import MANIFEST_FILE  # noqa: E402
from vit_service.backend import ONNX_CACHE, Fastest, load_backend  # noqa: E402
from vit_service.formats.onnx_export import ONNX_FILE  # noqa: E402
from vit_service.host import read_cpu  # noqa: E402
from vit_service.inference import Predictor  # noqa: E402
from vit_service.quantize import INT8_FILE  # noqa: E402

AVX2_ONLY = read_cpu("model name\t: AMD EPYC 7B12\nflags\t\t: sse2 avx avx2 fma\n")
WITH_BF16 = read_cpu("model name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16\n")


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    model, artifact = build_tiny_model()
    artifact.save(model, tmp_path / "model")
    return tmp_path / "model"


def test_bf16_is_never_timed_on_a_cpu_without_bf16_instructions(tiny_dir: Path, monkeypatch) -> None:
    import vit_service.inference as inference

    monkeypatch.setattr(inference, "read_cpu", lambda: AVX2_ONLY)
    seen: list[torch.dtype] = []
    real_autocast = torch.autocast

    def spy(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True, **kw):
        if enabled:
            seen.append(dtype)
        return real_autocast(device_type, dtype=dtype, enabled=enabled, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    predictor = Predictor.from_directory(tiny_dir, device="cpu", precision="auto")
    predictor.warmup(4)
    info = predictor.describe()
    assert info["precision"] == "fp32" and info["precision_timings_s"] == {} and seen == []
    assert "bf16 not timed" in info["precision_reason"]


def test_bf16_is_timed_where_the_cpu_has_it(tiny_dir: Path, monkeypatch) -> None:
    import vit_service.inference as inference

    monkeypatch.setattr(inference, "read_cpu", lambda: WITH_BF16)
    predictor = Predictor.from_directory(tiny_dir, device="cpu", precision="auto")
    predictor.warmup(4)
    info = predictor.describe()
    assert set(info["precision_timings_s"]) == {"fp32", "bf16"}
    assert info["precision"] == ("bf16" if info["precision_timings_s"]["bf16"] <= 0.9 * info["precision_timings_s"]["fp32"]
                                 else "fp32")


def test_backend_auto_exports_onnx_once_into_a_cache_beside_the_model(tiny_dir: Path) -> None:
    assert not (tiny_dir / ONNX_FILE).exists()
    predictor = load_backend(tiny_dir, backend="auto", device="cpu", precision="fp32")
    assert isinstance(predictor, Fastest) and set(predictor.candidates) == {"torch", "onnxruntime"}
    cached = tiny_dir / ONNX_CACHE / ONNX_FILE
    assert cached.is_file() and predictor.candidates["onnxruntime"].path == cached
    stamp = cached.stat().st_mtime_ns
    predictor.warmup(4)
    assert predictor.backend in ("torch", "onnxruntime") and set(predictor.backend_timings) == {"torch", "onnxruntime"}
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    expected = Predictor.from_directory(tiny_dir, device="cpu", precision="fp32").predict_proba(x)
    np.testing.assert_allclose(predictor.predict_proba(x), expected, atol=1e-5)
    load_backend(tiny_dir, backend="auto", device="cpu", precision="fp32")
    assert cached.stat().st_mtime_ns == stamp  # reused, not exported again
    assert not [p for p in (tiny_dir / ONNX_CACHE).iterdir() if p.name != ONNX_FILE]  # no leftovers


def test_backend_auto_where_the_cache_cannot_be_made_uses_a_temporary_one(tiny_dir: Path) -> None:
    (tiny_dir / ONNX_CACHE).write_text("")  # a file in the way (chmod does not stop root)
    predictor = load_backend(tiny_dir, backend="auto", device="cpu", precision="fp32")
    path = predictor.candidates["onnxruntime"].path
    assert path.is_file() and tiny_dir not in path.parents


def test_backend_torch_never_exports(tiny_dir: Path) -> None:
    load_backend(tiny_dir, backend="torch", device="cpu")
    assert not (tiny_dir / ONNX_CACHE).exists()


@pytest.fixture(scope="module")
def int8_models(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo run exported with --int8 (passes the guard), and the same with an int8-hostile head
    (fails it): see tests/test_int8.py."""
    from test_int8 import damage_for_int8

    root = tmp_path_factory.mktemp("int8_serving")
    ckpt = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    damaged = damage_for_int8(ckpt, root / "damaged.ckpt")
    out = {}
    for name, source in (("good", ckpt), ("damaged", damaged)):
        result = run_cli("vit-export", "--ckpt", str(source), "--int8", "--dir", str(root / name),
                         "--name", f"vit-{name}", env={"BENTOML_HOME": str(root / "bentoml")})
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = root / name
    out["home"] = root / "bentoml"
    return out


def test_int8_guard_at_serving(int8_models: dict[str, Path]) -> None:
    good, damaged = int8_models["good"], int8_models["damaged"]
    # explicit int8: served where the guard passes, a start-up error where it does not
    int8 = load_backend(good, precision="int8", device="cpu")
    assert int8.describe()["precision"] == "int8" and int8.describe()["int8"]["agreement_top1"] >= 0.99
    with pytest.raises(ValueError, match=r"VIT_PRECISION=int8 but its int8 version agreed with fp32 on .*below the 99% guard"):
        load_backend(damaged, precision="int8", device="cpu")
    # auto: int8 is a candidate only where the guard passes
    assert "onnxruntime int8" in load_backend(good, precision="auto", device="cpu").candidates
    assert "onnxruntime int8" not in load_backend(damaged, precision="auto", device="cpu").candidates
    # int8 agrees with the fp32 torch model on real images (the demo data's JPEGs, via the predictor)
    from vit_service.quantize import evaluation_images

    from vit_service.artifact import ModelArtifact
    from vit_service.preprocessing import open_image

    artifact = ModelArtifact.read(good)
    record = artifact.int8
    images = evaluation_images(record["measured_on"], artifact.class_names)
    x = np.stack([artifact.preprocessing.to_uint8(open_image(p)).numpy() for p, _ in images])
    fp32 = Predictor.from_directory(good, device="cpu", precision="fp32").predict_proba(x)
    assert np.mean(int8.predict_proba(x).argmax(1) == fp32.argmax(1)) == pytest.approx(record["agreement_top1"])


def test_int8_without_an_int8_model_is_a_start_up_error(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="VIT_PRECISION=int8 but the model has no int8 version .*vit-export --int8"):
        load_backend(tiny_dir, precision="int8", device="cpu")
    with pytest.raises(ValueError, match="runs on onnxruntime"):
        load_backend(tiny_dir, backend="torch", precision="int8", device="cpu")


def test_real_server_serves_int8_and_reports_it(int8_models: dict[str, Path], tmp_path: Path) -> None:
    env = {"VIT_MODEL_TAG": "vit-good", "VIT_PRECISION": "int8"}
    with bentoml_server(int8_models["home"], tmp_path / "serve.log", env) as url:
        info = httpx.get(f"{url}/model_info", timeout=30).json()
        serving = info["serving"]
        assert serving["precision"] == "int8" and serving["backend"] == "onnxruntime"
        assert serving["onnx_file"] == INT8_FILE
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
