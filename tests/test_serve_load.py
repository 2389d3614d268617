"""bench/serve_load.py: the LitServe peer (bench/litserve_service.py) answers what our model
answers, --pin puts the servers on one core and the client on another, a short real run with the
peer writes its row, and bad options are clear errors. Real processes, real JPEG bytes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bench import serve_load
from vit_service.artifact import ModelArtifact
from vit_service.backends import load_backend
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[1]
TWO_CORES = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--pin needs two usable cores")


def run_serve_load(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != serve_load.IMAGES_ENV}
    return subprocess.run([sys.executable, str(REPO / "bench" / "serve_load.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = ViTConfig.from_preset("vit_demo_patch8_64", num_classes=10)
    artifact = ModelArtifact(config=config, class_names=[f"class{i}" for i in range(10)],
                             preprocessing=Preprocessing(image_size=config.image_size))
    return artifact.save(VisionTransformer(config).eval(), tmp_path_factory.mktemp("model") / "m")


def jpeg(i: int, size: tuple[int, int] = (500, 375)) -> bytes:
    buf = io.BytesIO()
    serve_load.generated_image(i).resize(size, Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_litserve_peer_answers_what_our_model_answers(model_dir: Path, tmp_path: Path) -> None:
    predictor = load_backend(model_dir, backend="torch", device="cpu", precision="fp32")
    with serve_load.litserve_server(tmp_path / "litserve.log", model_dir, {}, "cpu", ready_timeout=180) as url:
        for i in range(3):
            data = jpeg(i)
            r = httpx.post(f"{url}/classify", files={"image": ("x.jpg", data, "image/jpeg")}, timeout=60)
            assert r.status_code == 200, r.text
            got = r.json()["predictions"]
            assert len(got) == 5
            pixels = predictor.preprocessing.to_uint8(Image.open(io.BytesIO(data)).convert("RGB")).numpy()[None]
            probs = predictor.predict_proba(pixels)[0]  # (K,)
            probs = np.asarray(probs, dtype=np.float64)
            # timm's eval transform (float resize) against ours (uint8): the same model, nearly the same input
            for p in got:
                assert p["label"] == f"class{p['index']}"
                assert p["score"] == pytest.approx(probs[p["index"]], abs=2e-3)
            assert [p["score"] for p in got] == sorted((p["score"] for p in got), reverse=True)


@TWO_CORES
def test_pinned_starts_processes_on_the_given_core_and_restores() -> None:
    cores = sorted(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    probe = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    with serve_load.pinned({cores[1]}):
        inside = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    assert inside == str([cores[1]])
    assert os.sched_getaffinity(0) == before
    with serve_load.pinned(None):
        assert os.sched_getaffinity(0) == before


@TWO_CORES
@pytest.mark.slow  # a pinned load run with two servers (~1 min); pinned() and the peer's answers stay in the fast set
def test_pinned_run_with_the_litserve_peer(tmp_path: Path) -> None:
    out = tmp_path / "serve_load.json"
    proc = run_serve_load("--pin", "--raw-int8", "--setups", "raw,litserve", "--preset", "vit_demo_patch8_64", "--clients", "1",
                          "--duration", "1", "--warmup", "0.3", "--raw-batch-sizes", "1", "--raw-seconds", "0.3",
                          "--image-kind", "photo", "--num-images", "2", "--json", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["args"]["server_cores"] != result["args"]["client_cores"]
    assert result["machine"]["torch_threads"] == 1
    assert result["raw"][0]["batch_size"] == 1 and result["raw"][0]["img_per_s"] > 0
    assert [(r["precision"], r["batch_size"]) for r in result["raw_int8"]] == [("openvino int8", 1)]
    assert any(line.startswith("int8 ceiling: raw int8 batch-1 p50 / best peer (f) LitServe") for line in result["report"])
    [row] = result["served"]
    assert row["setup"] == "litserve" and row["errors"] == 0 and row["img_per_s"] > 0 and row["p50_ms"] > 0
    assert row["precision"] == "fp32"
    assert any(line.startswith("| (f) LitServe service | fp32 | 1 |") for line in result["report"])
    assert result["report"][0].startswith("host: ")  # the host line from vit_service.host


def test_images_option_errors_name_the_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    proc = run_serve_load("--images", str(missing), "--setups", "raw")
    assert proc.returncode == 2 and f"--images {missing}: no such file or folder" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    proc = run_serve_load("--images", str(empty), "--setups", "raw", "--raw-seconds", "0.1")
    assert proc.returncode != 0 and f"--images {empty}: no .jpg/.jpeg files there" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_pin_needs_two_cores() -> None:
    core = min(os.sched_getaffinity(0))
    proc = run_serve_load("--pin", preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    assert proc.returncode == 2 and "--pin needs two usable cores" in proc.stderr


def test_raw_int8_model_is_quantized_and_agrees(model_dir: Path, tmp_path: Path) -> None:
    import openvino as ov

    from vit_service.quantize import INT8_FILE

    images = [(f"x{i}.jpg", jpeg(i)) for i in range(4)]  # what vit-export --int8 calibrates and measures on
    int8_dir = serve_load.int8_model_dir(model_dir, tmp_path / "int8", images)
    assert not (model_dir / INT8_FILE).exists()  # the served model is left as it was
    ops = {op.get_type_name() for op in ov.Core().read_model(str(int8_dir / INT8_FILE)).get_ops()}
    assert "FakeQuantize" in ops, sorted(ops)  # int8 quantization points, not a plain fp32 network
    assert serve_load.int8_model_dir(int8_dir, tmp_path / "again", images) == int8_dir  # an int8 model is reused
    int8 = serve_load.raw_predictor(int8_dir, "int8", threads=1)  # the raw loop's: no guard on a random model
    fp32 = load_backend(model_dir, backend="torch", device="cpu", precision="fp32")
    pixels = np.stack([fp32.preprocessing.to_uint8(Image.open(io.BytesIO(jpeg(i))).convert("RGB")).numpy()
                       for i in range(8)])
    a, b = int8.predict_proba(pixels), np.asarray(fp32.predict_proba(pixels))
    assert np.abs(a - b).max() < 0.05  # the same model, quantized: close, not equal
    assert np.abs(a - b).max() > 0
