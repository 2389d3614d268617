"""`vit-export --int8`: an OpenVINO int8 model (NNCF static quantization) beside fp32, measured against
it on real images (the demo data's JPEGs), the figures in vit_artifact.json, and the accuracy guard
that refuses an int8 model whose recorded agreement is below 99% (a model damaged for int8 on purpose)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nncf", reason="the int8 extra: pip install -e '.[int8]'")

from conftest import run_cli  # noqa: E402
from vit_service.artifact import MANIFEST_FILE, ArtifactError, ModelArtifact, load_model  # noqa: E402
from vit_service.preprocessing import open_image  # noqa: E402
from vit_service.quantize import INT8_FILE, MIN_AGREEMENT, RECIPES, evaluation_images, int8_guard  # noqa: E402


def export(*args: str, home: Path):
    return run_cli("vit-export", *args, env={"BENTOML_HOME": str(home)})


@pytest.fixture(scope="module")
def int8_export(int8_exports: dict[str, Path]) -> Path:
    """The demo run exported with --int8 by the real CLI (measured on the run's validation images):
    conftest's int8_exports, shared with tests/test_serving_speed.py."""
    assert "top-1 agreement with fp32" in (int8_exports["good"].parent / "good.stderr").read_text()
    store = list((int8_exports["home"] / "models" / "vit-good").glob("*/" + INT8_FILE))
    assert len(store) == 1  # in the BentoML model too
    assert ModelArtifact.read(store[0].parent).int8 is not None
    return int8_exports["good"]


def test_int8_export_records_agreement_and_both_accuracies(int8_export: Path, demo_data: Path) -> None:
    record = json.loads((int8_export / MANIFEST_FILE).read_text())["int8"]
    val_images = sum(1 for _ in (demo_data / "val").rglob("*.jpg"))
    assert record["file"] == INT8_FILE and (int8_export / INT8_FILE).is_file()
    assert (int8_export / record["weights_file"]).is_file() and record["runtime"] == "openvino"
    assert record["recipe"] in [name for name, _ in RECIPES] and record["calibration_images"] == val_images
    assert record["images"] == record["labelled"] == val_images
    assert record["measured_on"] == str((demo_data / "val").resolve())
    for key in ("agreement_top1", "fp32_top1", "int8_top1"):
        assert 0.0 <= record[key] <= 1.0
    assert record["agreement_top1"] >= MIN_AGREEMENT and int8_guard(record) is None
    # the recorded fp32 accuracy is the served model's: recompute it here with torch
    model, artifact = load_model(int8_export)
    images = evaluation_images(demo_data / "val", artifact.class_names)
    x = torch.stack([artifact.preprocessing(open_image(p)) for p, _ in images])
    with torch.inference_mode():
        top1 = model(x).argmax(1).numpy()
    assert record["fp32_top1"] == pytest.approx(np.mean(top1 == np.array([y for _, y in images])), abs=1e-4)


def int8_logits_of(folder: Path, x: torch.Tensor) -> np.ndarray:
    """(B, K) logits of folder's model.int8.xml on normalised pixels, through OpenVINO itself."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(folder / INT8_FILE), "CPU")
    return np.asarray(compiled(x.numpy())[0])


def test_int8_output_matches_fp32_on_real_jpegs(int8_export: Path, demo_data: Path) -> None:
    model, artifact = load_model(int8_export)
    images = evaluation_images(demo_data / "val", artifact.class_names)
    x = torch.stack([artifact.preprocessing(open_image(p)) for p, _ in images])  # (B, 3, S, S) float32
    with torch.inference_mode():
        p32 = model(x).softmax(-1).numpy()
    p8 = torch.from_numpy(int8_logits_of(int8_export, x)).softmax(-1).numpy()
    assert np.mean(p8.argmax(1) == p32.argmax(1)) >= 0.95
    assert np.abs(p8 - p32).max() < 0.05  # int8 is close, not equal
    assert np.abs(p8 - p32).max() > 0


def test_int8_ece_with_the_fp32_temperature(int8_export: Path, demo_data: Path) -> None:
    """fp32 and int8 apply the same T; vit_artifact.json records int8's ECE before and after it,
    recomputed here from the int8 graph's logits (15 bins, as torchmetrics counts them)."""
    from torchmetrics.classification import MulticlassCalibrationError

    calibration = json.loads((int8_export / MANIFEST_FILE).read_text())["calibration"]
    t = calibration["temperature"]
    model, artifact = load_model(int8_export)
    images = evaluation_images(demo_data / "val", artifact.class_names)
    x = torch.stack([artifact.preprocessing(open_image(p)) for p, _ in images])
    y = torch.tensor([label for _, label in images])
    logits = torch.from_numpy(int8_logits_of(int8_export, x)).double()
    oracle = MulticlassCalibrationError(artifact.config.num_classes, n_bins=15, norm="l1")
    assert calibration["int8"]["ece_before"] == pytest.approx(float(oracle(logits.softmax(-1).float(), y)), abs=1e-5)
    assert calibration["int8"]["ece_after"] == pytest.approx(float(oracle((logits / t).softmax(-1).float(), y)), abs=1e-5)
    from vit_service.backends import load_backend

    int8 = load_backend(int8_export, precision="int8", device="cpu")
    assert int8.describe()["calibration"] == {"temperature": t, **calibration["int8"]}


def test_the_guard_refuses_a_model_damaged_for_int8(int8_exports: dict[str, Path]) -> None:
    # `vit-export --ckpt <damage_for_int8 of the demo run> --int8` (conftest's int8_exports; exit 0)
    stderr = (int8_exports["damaged"].parent / "damaged.stderr").read_text()
    assert f"int8 ({RECIPES[1][0]})" in stderr  # the first recipe missed the guard, the second was tried
    assert "it will not serve (VIT_PRECISION=auto passes it over and VIT_PRECISION=int8 refuses to start)" in stderr
    record = ModelArtifact.read(int8_exports["damaged"]).int8
    assert record is not None and record["agreement_top1"] < MIN_AGREEMENT
    assert "below the 99% guard" in int8_guard(record)


def test_guard_rule() -> None:
    ov = {"file": INT8_FILE, "runtime": "openvino"}
    assert "no int8 version" in int8_guard(None)
    assert "no measured agreement" in int8_guard(ov)
    assert int8_guard({**ov, "agreement_top1": 0.99, "images": 100}) is None
    assert "98.90% of 1000 images" in int8_guard({**ov, "agreement_top1": 0.989, "images": 1000})
    # an int8 model an older vit-export made for onnxruntime: never served now, whatever it measured
    old = {"file": "model.int8.onnx", "agreement_top1": 1.0, "images": 100}
    assert "made for onnxruntime by an older vit-export" in int8_guard(old)


@pytest.mark.slow  # three vit-export subprocesses for three error messages (~55 s)
def test_int8_needs_images_to_measure_on(int8_export: Path, tmp_path: Path) -> None:
    from service_fixtures import build_tiny_model

    model, artifact = build_tiny_model()  # a model that knows no validation folder
    artifact.save(model, tmp_path / "tiny")
    out = export("--from", str(tmp_path / "tiny"), "--int8", home=tmp_path / "bentoml")
    assert out.returncode == 2 and "give --calib DIR" in out.stderr and "Traceback" not in out.stderr
    out = export("--from", str(int8_export), "--int8", "--calib", str(tmp_path / "nowhere"), home=tmp_path / "bentoml")
    assert out.returncode == 2 and f"{tmp_path / 'nowhere'}: image folder not found" in out.stderr
    (tmp_path / "empty").mkdir()
    out = export("--from", str(int8_export), "--int8", "--calib", str(tmp_path / "empty"), home=tmp_path / "bentoml")
    assert out.returncode == 2 and "no images found" in out.stderr


@pytest.mark.slow  # a vit-export subprocess (~25 s); the int8 record and the guard stay fast
def test_calib_folder_for_a_pretrained_model(int8_export: Path, demo_data: Path, tmp_path: Path) -> None:
    """--from an exported model with --calib: class folders give accuracies; the old int8 record
    is replaced by the new measurement, limited to --calib-limit images."""
    out = export("--from", str(int8_export), "--int8", "--calib", str(demo_data / "val"), "--calib-limit", "7",
                 "--dir", str(tmp_path / "out"), home=tmp_path / "bentoml")
    assert out.returncode == 0, out.stderr[-3000:]
    record = ModelArtifact.read(tmp_path / "out").int8
    assert record["images"] == record["labelled"] == 7
    classes = {Path(p).parent.name for p, _ in evaluation_images(demo_data / "val", [], limit=7)}
    assert len(classes) == min(7, len(list((demo_data / "val").iterdir())))  # every class in turn


def test_without_int8_an_exported_folder_drops_the_old_record(int8_export: Path, tmp_path: Path) -> None:
    out = export("--from", str(int8_export), "--dir", str(tmp_path / "out"), home=tmp_path / "bentoml")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ModelArtifact.read(tmp_path / "out").int8 is None and not (tmp_path / "out" / INT8_FILE).exists()


def test_a_manifest_naming_a_missing_int8_file_is_refused(int8_export: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(int8_export, tmp_path / "m")
    (tmp_path / "m" / INT8_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"records an int8 model {INT8_FILE} that is not in"):
        ModelArtifact.read(tmp_path / "m")
