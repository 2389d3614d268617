"""`vit-export --onnx`: model.onnx with a dynamic batch axis, onnxruntime parity on real JPEGs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="the onnx extra: pip install -e '.[onnx]'")

from conftest import run_cli  # noqa: E402
from service_fixtures import build_tiny_model  # noqa: E402
from test_pretrained_serving import jpeg_bytes  # noqa: E402
from vit_service.formats.onnx_export import ONNX_FILE, OnnxExportError, export_onnx  # noqa: E402
from vit_service.inference import Predictor  # noqa: E402
from vit_service.onnx_backend import OnnxPredictor  # noqa: E402
from vit_service.preprocessing import decode_image  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model exported by the real CLI with --onnx (from its artifact folder)."""
    root = tmp_path_factory.mktemp("onnx")
    model, artifact = build_tiny_model()
    artifact.save(model, root / "src")
    out = run_cli("vit-export", "--from", str(root / "src"), "--onnx", "--dir", str(root / "out"), "--hf-dir", str(root / "hf"),
                  env={"BENTOML_HOME": str(root / "bentoml")})
    assert out.returncode == 0, out.stderr[-3000:]
    store = list((root / "bentoml" / "models" / "vit-classifier").glob("*/" + ONNX_FILE))
    assert len(store) == 1  # written into the BentoML model too
    return root / "out"


def real_jpeg_batch(directory: Path, n: int) -> np.ndarray:
    pre = Predictor.from_directory(directory, device="cpu", precision="fp32").preprocessing
    return np.stack([pre.to_uint8(decode_image(jpeg_bytes(i, (96 + 8 * i, 64)))).numpy() for i in range(n)])


def test_onnxruntime_matches_torch_on_real_jpegs_at_any_batch_size(exported: Path) -> None:
    import onnxruntime as ort

    torch_predictor = Predictor.from_directory(exported, device="cpu", precision="fp32")
    session = ort.InferenceSession(str(exported / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 3, 7):
        images = real_jpeg_batch(exported, n)
        pixels = torch_predictor.preprocessing.normalize(torch.from_numpy(images))  # (n, 3, S, S)
        with torch.no_grad():
            expected = torch_predictor.model(pixels).numpy()
        got = session.run(["logits"], {"pixel_values": pixels.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4
        assert np.abs(OnnxPredictor(exported).predict_proba(images) - torch_predictor.predict_proba(images)).max() <= 1e-4


def test_missing_exporter_dependency_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what an absent package looks like to import
    model, artifact = build_tiny_model()
    with pytest.raises(OnnxExportError, match="pip install"):
        export_onnx(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_exporter_dependency_saves_nothing(tmp_path: Path) -> None:
    # The real vit-export in a process where `import onnxscript` fails (a stand-in package that
    # raises ImportError, first on PYTHONPATH): exit 2, one clear line, and nothing saved: no
    # model in the BentoML store, no --dir folder, no --hf-dir folder.
    model, artifact = build_tiny_model()
    artifact.save(model, tmp_path / "src")
    (tmp_path / "no_onnxscript/onnxscript").mkdir(parents=True)
    (tmp_path / "no_onnxscript/onnxscript/__init__.py").write_text(
        "raise ImportError(\"No module named 'onnxscript'\", name='onnxscript')\n")
    home = tmp_path / "bentoml"
    r = run_cli("vit-export", "--from", str(tmp_path / "src"), "--onnx", "--name", "never-saved",
                "--dir", str(tmp_path / "out"), "--hf-dir", str(tmp_path / "hf"), env={"BENTOML_HOME": str(home),
                                                     "PYTHONPATH": os.pathsep.join(
                    [str(tmp_path / "no_onnxscript"), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "onnxscript" in r.stderr and "pip install" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()
    saved = [p.relative_to(home) for p in (home / "models").rglob("*") if p.is_file()] if (home / "models").exists() else []
    assert saved == [], saved


def test_vit_backend_auto_times_both_and_serves_with_the_one_it_measured_faster(exported: Path) -> None:
    from vit_service.backend import Fastest, load_backend

    predictor = load_backend(exported, backend="auto", device="cpu", precision="fp32")
    assert isinstance(predictor, Fastest)
    predictor.warmup(2)
    t = predictor.backend_timings
    assert set(t) == {"torch", "onnxruntime"} and all(v > 0 for v in t.values())
    # Whichever was chosen (the rule itself is checked with given timings below) is what serves.
    assert predictor.describe()["backend"] == predictor.backend
    assert type(predictor.chosen).__name__ == {"torch": "Predictor", "onnxruntime": "OnnxPredictor"}[predictor.backend]
    images = real_jpeg_batch(exported, 2)
    expected = Predictor.from_directory(exported, device="cpu", precision="fp32").predict_proba(images)
    assert np.abs(predictor.predict_proba(images) - expected).max() <= 1e-4
    assert isinstance(load_backend(exported, backend="torch", device="cpu"), Predictor)


class _Timed:
    """A stand-in backend whose every forward pass takes `seconds` on a shared fake clock, and
    whose output says who computed it."""

    def __init__(self, name: str, seconds: float, clock: list[float], artifact) -> None:
        self.name, self.seconds, self.clock = name, seconds, clock
        self.artifact, self.preprocessing, self.input_shape = artifact, artifact.preprocessing, (3, 32, 32)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        self.clock[0] += self.seconds
        return np.full((len(images), 4), {"torch": 0.0, "onnxruntime": 1.0}[self.name], np.float32)

    def warmup(self, max_batch_size: int) -> float:
        return 0.0

    def describe(self) -> dict:
        return {"backend": self.name}


@pytest.mark.parametrize("onnx_s, chosen", [(0.080, "onnxruntime"), (0.095, "torch"), (0.120, "torch")])
def test_vit_backend_auto_rule_with_given_timings(monkeypatch: pytest.MonkeyPatch, onnx_s: float, chosen: str) -> None:
    # torch takes 0.100 s a pass; onnxruntime is kept only when >= 10% faster (README: VIT_BACKEND).
    # The race runs on a fake clock the stand-ins advance (its wall-time budget stays real).
    import time

    import vit_service.backend as backend

    clock = [0.0]
    real_faster = backend.faster
    monkeypatch.setattr(backend, "faster", lambda candidate, baseline, **kw: real_faster(
        candidate, baseline, **{**kw, "clock": lambda: clock[0], "budget_clock": time.perf_counter}))
    _, artifact = build_tiny_model()
    two = backend.Fastest({"torch": _Timed("torch", 0.100, clock, artifact),
                           "onnxruntime": _Timed("onnxruntime", onnx_s, clock, artifact)})
    two.warmup(2)
    assert two.backend_timings == {"torch": 0.1, "onnxruntime": onnx_s}
    assert two.backend == chosen and two.describe()["backend_choice"] == chosen
    served = two.predict_proba(np.zeros((1, 3, 32, 32), np.uint8))
    assert served[0, 0] == {"torch": 0.0, "onnxruntime": 1.0}[chosen]  # the chosen one computes


def test_every_backend_keeps_the_predictor_contract(exported: Path) -> None:
    """torch, onnxruntime and the faster of the two are ImagePredictors that refuse a wrong batch
    with the same message (the check is written once, vit_service/predictor.py)."""
    from vit_service.backend import load_backend
    from vit_service.predictor import ImagePredictor

    predictors = [Predictor.from_directory(exported, device="cpu", precision="fp32"), OnnxPredictor(exported),
                  load_backend(exported, backend="auto", device="cpu", precision="fp32")]
    messages = set()
    for predictor in predictors:
        assert isinstance(predictor, ImagePredictor), type(predictor)
        assert predictor.input_shape == (3, 32, 32)
        with pytest.raises(ValueError) as e:
            predictor.predict_proba(np.zeros((2, 3, 16, 16), np.float32))
        messages.add(str(e.value))
        assert predictor.predict_proba(np.zeros((0, 3, 32, 32), np.uint8)).shape == (0, 4)
    assert messages == {"expected a uint8 batch of shape (B, 3, 32, 32), got float32 (2, 3, 16, 16)"}


def test_vit_backend_onnxruntime_without_model_onnx_says_how_to_export(tmp_path: Path) -> None:
    from vit_service.backend import load_backend

    model, artifact = build_tiny_model()
    artifact.save(model, tmp_path)
    with pytest.raises(ValueError, match="vit-export --onnx"):
        load_backend(tmp_path, backend="onnxruntime")
    with pytest.raises(ValueError, match="VIT_BACKEND must be one of"):
        load_backend(tmp_path, backend="tensorrt")


def test_service_with_vit_backend_onnxruntime_serves_the_same_probabilities(exported: Path) -> None:
    import httpx

    from service_fixtures import bentoml_server

    image = jpeg_bytes(5, (100, 70))
    torch_predictor = Predictor.from_directory(exported, device="cpu", precision="fp32")
    pre = torch_predictor.preprocessing
    # decoded as the service decodes (JPEG draft scaling down to about the resize size)
    expected = torch_predictor.predict_proba(pre.to_uint8(decode_image(image, draft_size=pre.resize_size))[None].numpy())[0]
    home = exported.parent / "bentoml"
    with bentoml_server(home, exported.parent / "server.log", {"VIT_BACKEND": "onnxruntime"}) as url:
        r = httpx.post(f"{url}/classify", files={"image": ("x.jpg", image, "image/jpeg")}, data={"top_k": "4"}, timeout=60)
        info = httpx.get(f"{url}/model_info", timeout=30).json()
    assert r.status_code == 200, r.text
    assert info["serving"]["backend"] == "onnxruntime"
    for p in r.json()["predictions"]:
        assert abs(p["score"] - float(expected[p["index"]])) <= 1e-4


def test_vit_export_hf_dir_writes_a_folder_transformers_loads_with_the_same_logits(exported: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is a dev extra")

    hf = transformers.ViTForImageClassification.from_pretrained(exported.parent / "hf").eval()
    ours = Predictor.from_directory(exported, device="cpu", precision="fp32")
    pixels = ours.preprocessing.normalize(torch.from_numpy(real_jpeg_batch(exported, 2)))
    with torch.no_grad():
        assert (hf(pixel_values=pixels).logits - ours.model(pixels)).abs().max().item() <= 1e-4
    assert list(hf.config.id2label.values()) == ours.artifact.class_names
