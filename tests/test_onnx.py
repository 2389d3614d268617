"""`vit-export --onnx`: model.onnx with a dynamic batch axis, onnxruntime (the oracle) parity on real
JPEGs; OpenVINO serves that file with torch's probabilities."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="the onnx extra: pip install -e '.[onnx]'")

from conftest import run_cli, run_cli_in_process  # noqa: E402
from service_fixtures import build_tiny_model  # noqa: E402
from test_pretrained_serving import jpeg_bytes  # noqa: E402
from vit_service.artifact import ModelArtifact  # noqa: E402
from vit_service.backends import Predictor, load_backend  # noqa: E402
from vit_service.formats.onnx_export import ONNX_FILE, OnnxExportError, export_onnx  # noqa: E402
from vit_service.preprocessing import decode_image  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model exported by the real CLI with --onnx (from its artifact folder)."""
    root = tmp_path_factory.mktemp("onnx")
    model, artifact = build_tiny_model()
    artifact.save(model, root / "src")
    out = run_cli_in_process("vit-export", "--from", str(root / "src"), "--onnx", "--dir", str(root / "out"), "--hf-dir", str(root / "hf"),
                  env={"BENTOML_HOME": str(root / "bentoml")})
    assert out.returncode == 0, out.stderr[-3000:]
    store = list((root / "bentoml" / "models" / "vit-classifier").glob("*/" + ONNX_FILE))
    assert len(store) == 1  # written into the BentoML model too
    return root / "out"


def real_jpeg_batch(directory: Path, n: int) -> np.ndarray:
    pre = ModelArtifact.read(directory).preprocessing
    return np.stack([pre.to_uint8(decode_image(jpeg_bytes(i, (96 + 8 * i, 64)))).numpy() for i in range(n)])


def torch_fp32(directory: Path) -> Predictor:
    return load_backend(directory, backend="torch", device="cpu", precision="fp32")


def test_onnxruntime_matches_torch_on_real_jpegs_at_any_batch_size(exported: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    torch_predictor = torch_fp32(exported)
    # what serves the file: OpenVINO reads model.onnx (nothing converted, nothing written to the cache)
    served = load_backend(exported, backend="openvino", device="cpu", precision="fp32", cache=tmp_path)
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
        assert np.abs(served.predict_proba(images) - torch_predictor.predict_proba(images)).max() <= 1e-4
    assert not served.source.loaded and list(tmp_path.iterdir()) == []


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


def test_every_backend_keeps_the_predictor_contract(exported: Path, tmp_path: Path) -> None:
    """torch, openvino and auto's choice are served by one Predictor that refuses a wrong batch with
    the same message (the check is written once, vit_service/backends/base.py)."""
    predictors = [load_backend(exported, backend=name, device="cpu", precision="fp32", cache=tmp_path)
                  for name in ("torch", "openvino", "auto")]
    predictors[2].warmup(2)  # auto chooses its runtime here
    messages = set()
    for predictor in predictors:
        assert isinstance(predictor, Predictor), type(predictor)
        assert predictor.input_shape == (3, 32, 32)
        with pytest.raises(ValueError) as e:
            predictor.predict_proba(np.zeros((2, 3, 16, 16), np.float32))
        messages.add(str(e.value))
        assert predictor.predict_proba(np.zeros((0, 3, 32, 32), np.uint8)).shape == (0, 4)
    assert messages == {"expected a uint8 batch of shape (B, 3, 32, 32), got float32 (2, 3, 16, 16)"}
    assert [p.backend for p in predictors[:2]] == ["torch", "openvino"]


def test_service_with_vit_backend_openvino_serves_the_same_probabilities(exported: Path) -> None:
    import httpx

    from service_fixtures import bentoml_server

    image = jpeg_bytes(5, (100, 70))
    torch_predictor = torch_fp32(exported)
    pre = torch_predictor.preprocessing
    # decoded as the service decodes (JPEG draft scaling down to about the resize size)
    expected = torch_predictor.predict_proba(pre.to_uint8(decode_image(image, draft_size=pre.resize_size))[None].numpy())[0]
    home = exported.parent / "bentoml"
    env = {"VIT_BACKEND": "openvino", "VIT_PRECISION": "fp32"}  # fp32: bf16 would be a candidate on a bf16 CPU
    with bentoml_server(home, exported.parent / "server.log", env) as url:
        r = httpx.post(f"{url}/classify", files={"image": ("x.jpg", image, "image/jpeg")}, data={"top_k": "4"}, timeout=60)
        info = httpx.get(f"{url}/model_info", timeout=30).json()
    assert r.status_code == 200, r.text
    assert (info["serving"]["backend"], info["serving"]["precision"]) == ("openvino", "fp32")
    assert "decision" not in info["serving"]  # one candidate: nothing raced
    for p in r.json()["predictions"]:  # fp32 in both runtimes: the same scores to 1e-4
        assert abs(p["score"] - float(expected[p["index"]])) <= 1e-4


def test_vit_export_hf_dir_writes_a_folder_transformers_loads_with_the_same_logits(exported: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is a dev extra")

    hf = transformers.ViTForImageClassification.from_pretrained(exported.parent / "hf").eval()
    ours = torch_fp32(exported)
    pixels = ours.preprocessing.normalize(torch.from_numpy(real_jpeg_batch(exported, 2)))
    with torch.no_grad():
        assert (hf(pixel_values=pixels).logits - ours.model(pixels)).abs().max().item() <= 1e-4
    assert list(hf.config.id2label.values()) == ours.artifact.class_names
