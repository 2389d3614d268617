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

from conftest import run_cli_in_process  # noqa: E402
from vit_service.artifact import MANIFEST_FILE, ArtifactError, ModelArtifact, load_model  # noqa: E402
from vit_service.preprocessing import open_image  # noqa: E402
from vit_service.quantize import INT8_FILE, MIN_AGREEMENT, RECIPES, evaluation_images, int8_guard  # noqa: E402


def export(*args: str, home: Path):
    return run_cli_in_process("vit-export", *args, env={"BENTOML_HOME": str(home)})


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
    # each reason whole: check_servable puts it in the start-up error, and it names the fix
    fix = "re-export it with vit-export --int8"
    assert int8_guard({}) == "the model has no int8 version (export it with vit-export --int8)"
    assert int8_guard(old) == ("its int8 version was made for onnxruntime by an older vit-export, which serving no "
                               f"longer runs ({fix})")
    assert int8_guard(ov) == f"the model's int8 record has no measured agreement ({fix})"
    assert int8_guard({**ov, "agreement_top1": 0.5, "images": 8}, min_agreement=0.6) == (
        "its int8 version agreed with fp32 on 50.00% of 8 images, below the 60% guard")
    assert int8_guard({**ov, "agreement_top1": 0.5, "images": 8}, min_agreement=0.5) is None


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


# ----------------------------------------------------------------- in-process, on the tiny model
# (fast enough for mutation testing: scripts/mutation.py runs test_int8.py's "tiny" tests per mutant)

def tiny_image_folder(root: Path) -> Path:
    """Class folders named like the tiny model's classes (2 JPEGs each, 3 for the last), a folder no class
    is named after, two loose images, a hidden folder and an unreadable .jpg."""
    from service_fixtures import CLASS_NAMES, picture

    for c, name in enumerate(CLASS_NAMES):
        (root / name).mkdir(parents=True)
        for i in range(2 + (c == len(CLASS_NAMES) - 1)):
            picture(10 * c + i, (48, 40)).save(root / name / f"{i}.jpg", quality=90)
    (root / "other").mkdir()
    picture(99, (40, 48)).save(root / "other" / "x.png")
    picture(98).save(root / "loose_b.jpg")
    picture(97).save(root / "loose_a.png")
    (root / ".hidden").mkdir()
    picture(96).save(root / ".hidden" / "h.jpg")
    (root / "square" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def test_tiny_evaluation_images_labels_order_and_limit(tmp_path: Path) -> None:
    import re

    from service_fixtures import CLASS_NAMES, picture

    from vit_service.quantize import QuantizeError

    root = tiny_image_folder(tmp_path / "images")
    images = evaluation_images(root, CLASS_NAMES)
    loose = [(str(root / "loose_a.png"), None), (str(root / "loose_b.jpg"), None)]
    first = [(str(root / n / "0.jpg"), i) for i, n in sorted(enumerate(CLASS_NAMES), key=lambda t: t[1])]
    # round-robin: the loose images, then each folder in name order (other after circle), one at a time
    by_group = [loose[0], (str(root / "circle" / "0.jpg"), 0), (str(root / "other" / "x.png"), None),
                (str(root / "square" / "0.jpg"), 1), (str(root / "star" / "0.jpg"), 3),
                (str(root / "triangle" / "0.jpg"), 2)]
    assert images[:6] == by_group and {p for p, _ in first} <= {p for p, _ in images}
    assert images[6] == loose[1]
    assert len(images) == 2 + 1 + 2 * 4 + 1 + 1  # + the broken file (it has an image's name), no hidden one
    assert not any(".hidden" in p for p, _ in images)
    assert evaluation_images(root, CLASS_NAMES, limit=3) == images[:3]
    assert evaluation_images(root, CLASS_NAMES, limit=0) == images  # 0: no limit
    assert evaluation_images(root, [])[1] == (str(root / "circle" / "0.jpg"), None)  # no class names: no labels
    with pytest.raises(QuantizeError, match=rf"^{tmp_path / 'nowhere'}: image folder not found \(give --calib DIR: a "
                                            r"folder of images, in class folders named like the model's classes for "
                                            r"labels\)$"):
        evaluation_images(tmp_path / "nowhere", CLASS_NAMES)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    from vit_service.preprocessing import IMAGE_EXTENSIONS

    with pytest.raises(QuantizeError, match=rf"^{tmp_path / 'empty'}: no images found \(looked for "
                                            rf"{re.escape(', '.join(sorted(IMAGE_EXTENSIONS)))}\)$"):
        evaluation_images(tmp_path / "empty", CLASS_NAMES)
    (root / "more.png").mkdir()  # a folder with an image's name is a folder, not a loose image
    picture(95).save(root / "more.png" / "m.jpg")
    again = evaluation_images(root, CLASS_NAMES)
    assert (str(root / "more.png"), None) not in again and (str(root / "more.png" / "m.jpg"), None) in again


def test_tiny_pixel_batches_and_logits_skip_unreadable_files(tmp_path: Path) -> None:
    from service_fixtures import CLASS_NAMES, build_tiny_model

    from vit_service.quantize import QuantizeError, image_logits, pixel_batches

    model, artifact = build_tiny_model()
    root = tiny_image_folder(tmp_path / "images")
    images = evaluation_images(root, CLASS_NAMES)
    skipped: list[str] = []
    batches = list(pixel_batches(artifact.preprocessing, images, skipped, batch_size=5))
    assert [len(labels) for _, labels in batches] == [5, 5, 2]  # 13 files, the broken one left out
    assert len(skipped) == 1 and "broken.jpg" in skipped[0]
    readable = [(p, y) for p, y in images if "broken" not in p]
    assert [y for _, labels in batches for y in labels] == [y for _, y in readable]
    expected = torch.stack([artifact.preprocessing(open_image(p)) for p, _ in readable])  # (N, 3, S, S)
    assert torch.equal(torch.cat([x for x, _ in batches]), expected)
    logits, labels = image_logits(model, artifact.preprocessing, images)
    with torch.inference_mode():
        assert np.allclose(logits, model(expected).numpy(), atol=1e-5) and logits.dtype == np.float32
    assert labels.tolist() == [-1 if y is None else y for _, y in readable]
    with pytest.raises(QuantizeError, match="no readable images .*broken.jpg"):
        image_logits(model, artifact.preprocessing, [(str(root / "square" / "broken.jpg"), 1)])
    with pytest.raises(QuantizeError, match=r"no readable images \(none given\)"):
        image_logits(model, artifact.preprocessing, [])


def test_tiny_build_int8_writes_the_model_and_its_record(tmp_path: Path) -> None:
    """NNCF on the tiny model: the int8 file serving reads, and a record whose figures are recomputed
    here: top-1 of the torch model against the saved int8 model compiled as serving compiles it."""
    from service_fixtures import CLASS_NAMES, build_tiny_model

    from vit_service.backends.openvino_runtime import compile_for_cpu
    from vit_service.quantize import CALIBRATION_IMAGES, build_int8, int8_logits

    model, artifact = build_tiny_model()
    root = tiny_image_folder(tmp_path / "images")
    images = evaluation_images(root, CLASS_NAMES)
    lines: list[str] = []
    record = build_int8(model, artifact, tmp_path, images, measured_on="the test's images", log=lines.append)
    readable = [(p, y) for p, y in images if "broken" not in p]
    labelled = [(p, y) for p, y in readable if y is not None]
    assert (tmp_path / INT8_FILE).is_file() and (tmp_path / record["weights_file"]).is_file()
    assert record["file"] == INT8_FILE and record["weights_file"] == "model.int8.bin"
    assert record["runtime"] == "openvino" and record["measured_on"] == "the test's images"
    assert record["calibration_images"] == min(len(readable), CALIBRATION_IMAGES)
    assert (record["images"], record["labelled"], record["unreadable"]) == (len(readable), len(labelled), 1)
    assert record["min_agreement"] == MIN_AGREEMENT
    import nncf
    import openvino

    assert record["activations"] == "int8, ranges calibrated at export"
    assert record["openvino"] == openvino.get_version().split("-")[0] and "-" not in record["openvino"]
    assert record["nncf"] == nncf.__version__
    assert record["recipe"] == RECIPES[len(lines) - 1][0]  # the last recipe tried is the one kept here ...
    assert (record["agreement_top1"] >= MIN_AGREEMENT) == (len(lines) == 1)  # ... the first only if it passes
    x = torch.stack([artifact.preprocessing(open_image(p)) for p, _ in readable])
    with torch.inference_mode():
        p32 = model(x).softmax(-1).numpy()
    request = compile_for_cpu(str(tmp_path / INT8_FILE), "int8").create_infer_request()
    request.infer({0: x.numpy()})
    p8 = torch.from_numpy(np.array(request.get_output_tensor(0).data)).softmax(-1).numpy()
    y = np.array([label for _, label in labelled])
    is_labelled = np.array([label is not None for _, label in readable])
    if len(lines) == 1:  # the saved model is the one measured
        assert record["agreement_top1"] == pytest.approx(np.mean(p8.argmax(1) == p32.argmax(1)), abs=1e-5)
        assert record["int8_top1"] == pytest.approx(np.mean(p8.argmax(1)[is_labelled] == y), abs=1e-5)
        assert record["max_prob_diff"] == pytest.approx(np.abs(p8 - p32).max(), abs=1e-5)
    assert record["fp32_top1"] == pytest.approx(np.mean(p32.argmax(1)[is_labelled] == y), abs=1e-5)
    assert f"top-1 agreement with fp32 {record['agreement_top1']:.2%} on {len(readable)} images" in lines[-1]
    logits, labels = int8_logits(tmp_path / INT8_FILE, artifact.preprocessing, images)
    assert np.allclose(logits, np.array(request.get_output_tensor(0).data), atol=1e-4)
    assert labels.tolist() == [-1 if y is None else y for _, y in readable]


def test_tiny_measure_agreement_counts_each_model_against_the_labels(tmp_path: Path) -> None:
    """measure_agreement with another network (the tiny model of another seed) standing in for int8,
    so the two disagree: every figure recomputed here from both models' probabilities."""
    from service_fixtures import CLASS_NAMES, build_tiny_model

    from vit_service.backends.openvino_runtime import compile_for_cpu, convert
    from vit_service.quantize import measure_agreement

    model, artifact = build_tiny_model()
    other = convert(build_tiny_model(seed=1)[0])
    images = evaluation_images(tiny_image_folder(tmp_path / "images"), CLASS_NAMES)
    figures = measure_agreement(model, artifact, other, images)
    readable = [(p, y) for p, y in images if "broken" not in p]
    x = torch.stack([artifact.preprocessing(open_image(p)) for p, _ in readable])
    with torch.inference_mode():
        p32 = model(x).softmax(-1).numpy()
    request = compile_for_cpu(other, "int8").create_infer_request()
    request.infer({0: x.numpy()})
    p8 = torch.from_numpy(np.array(request.get_output_tensor(0).data)).softmax(-1).numpy()
    labelled = np.array([y is not None for _, y in readable])
    y = np.array([label for _, label in readable if label is not None])
    agreement = np.mean(p8.argmax(1) == p32.argmax(1))
    assert 0 < agreement < 1  # they do disagree, so each count below is its own model's
    assert figures == pytest.approx({
        "images": len(readable), "labelled": int(labelled.sum()), "agreement_top1": agreement,
        "fp32_top1": np.mean(p32.argmax(1)[labelled] == y), "int8_top1": np.mean(p8.argmax(1)[labelled] == y),
        "max_prob_diff": np.abs(p8 - p32).max(), "unreadable": 1}, abs=1e-4)
    assert figures["fp32_top1"] != figures["int8_top1"]
    # recorded to 5 decimals: the counts' ratios exactly, the largest difference as well
    assert (figures["agreement_top1"], figures["fp32_top1"], figures["int8_top1"]) == (
        round(float(agreement), 5), round(float(np.mean(p32.argmax(1)[labelled] == y)), 5),
        round(float(np.mean(p8.argmax(1)[labelled] == y)), 5))
    assert figures["max_prob_diff"] == round(figures["max_prob_diff"], 5)
    unlabelled = [(p, None) for p, _ in readable]
    assert measure_agreement(model, artifact, other, unlabelled)["int8_top1"] is None


def test_tiny_measurements_count_across_batches_and_refuse_no_images(tmp_path: Path) -> None:
    """More images than one evaluation batch (EVAL_BATCH): every batch counts; one image is enough."""
    from service_fixtures import CLASS_NAMES, build_tiny_model

    from vit_service.backends.openvino_runtime import convert
    from vit_service.quantize import EVAL_BATCH, QuantizeError, image_logits, measure_agreement

    model, artifact = build_tiny_model()
    other = convert(build_tiny_model(seed=1)[0])
    images = [(p, y) for p, y in evaluation_images(tiny_image_folder(tmp_path / "images"), CLASS_NAMES)
              if "broken" not in p]
    once = measure_agreement(model, artifact, other, images)
    many = images * (EVAL_BATCH // len(images) + 2)  # (the same files again: the counts scale exactly)
    again = measure_agreement(model, artifact, other, many)
    assert len(many) > EVAL_BATCH and again["images"] == len(many)
    assert again["labelled"] == once["labelled"] * len(many) // len(images)
    for key in ("agreement_top1", "fp32_top1", "int8_top1", "max_prob_diff"):
        assert again[key] == pytest.approx(once[key], abs=1e-5), key
    logits, labels = image_logits(model, artifact.preprocessing, many)
    assert logits.shape[0] == len(labels) == len(many)
    assert labels.tolist() == [-1 if y is None else y for _, y in many]
    assert measure_agreement(model, artifact, other, images[:1])["images"] == 1
    broken = tmp_path / "images" / "square" / "broken.jpg"
    with pytest.raises(QuantizeError, match=rf"^no readable images to measure int8 on \(.*{broken.name}"):
        measure_agreement(model, artifact, other, [(str(broken), 1)])
    with pytest.raises(QuantizeError, match=r"^no readable images to measure int8 on \(none given\)$"):
        measure_agreement(model, artifact, other, [])


def test_tiny_build_int8_refuses_what_it_cannot_quantize(tmp_path: Path, monkeypatch) -> None:
    import sys

    from service_fixtures import build_tiny_model

    from vit_service.quantize import QuantizeError, build_int8

    model, artifact = build_tiny_model()
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(QuantizeError, match=r"^no readable images to calibrate int8 on \(.*broken.jpg"):
        build_int8(model, artifact, tmp_path, [(str(tmp_path / "broken.jpg"), None)], measured_on="x")
    with pytest.raises(QuantizeError, match=r"^no readable images to calibrate int8 on \(none given\)$"):
        build_int8(model, artifact, tmp_path, [], measured_on="x")
    monkeypatch.setitem(sys.modules, "nncf", None)  # not installed
    with pytest.raises(QuantizeError, match=r"^int8 export needs openvino and nncf: pip install -e '\.\[int8\]'$"):
        build_int8(model, artifact, tmp_path, [], measured_on="x")
    assert not (tmp_path / INT8_FILE).exists()


def _patch_embedding_inputs(xml: Path) -> list[str]:
    """What the saved model's patch-embedding convolution reads: FakeQuantize (int8 pixels) and Multiply
    (dequantised int8 weights), or Parameter and a float Constant where it was kept in float."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    [conv] = [op for op in model.get_ops() if op.get_type_name() == "Convolution"]
    assert "patch_embed" in conv.get_friendly_name()
    return [i.get_source_output().get_node().get_type_name() for i in conv.inputs()]


def test_tiny_build_int8_tries_the_recipes_in_turn_and_keeps_the_best(tmp_path: Path, monkeypatch) -> None:
    from service_fixtures import CLASS_NAMES, build_tiny_model

    import vit_service.quantize as quantize

    model, artifact = build_tiny_model()
    root = tiny_image_folder(tmp_path / "images")
    labelled = evaluation_images(root, CLASS_NAMES)
    # no recipe meets a guard above 100%: both are tried and the better kept, the first on a tie (this
    # model's case: both agree on every image, so the record and the first line are the first recipe's)
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", 1.01)
    lines: list[str] = []
    record = quantize.build_int8(model, artifact, tmp_path / "both", labelled, "t", log=lines.append)
    assert len(lines) == len(RECIPES) == 2 and lines[0].split(":")[1] == lines[1].split(":")[1]  # a tie
    assert record["recipe"] == RECIPES[0][0] and record["method"] == "NNCF static post-training quantization"
    assert lines[0] == (f"int8 ({RECIPES[0][0]}): top-1 agreement with fp32 {record['agreement_top1']:.2%} on "
                        f"{record['images']} images; top-1 fp32 {record['fp32_top1']:.2%}, int8 "
                        f"{record['int8_top1']:.2%}")
    xml = tmp_path / "both" / INT8_FILE
    assert _patch_embedding_inputs(xml) == ["FakeQuantize", "Multiply"]  # the first recipe quantizes it
    # a guard met exactly stops at the first recipe
    monkeypatch.setattr(quantize, "MIN_AGREEMENT", record["agreement_top1"])
    lines.clear()
    met = quantize.build_int8(model, artifact, tmp_path / "met", labelled, "t", log=lines.append)
    assert met["recipe"] == RECIPES[0][0]
    assert len(lines) == 1
    # the second recipe keeps the patch embedding in float; unlabelled images: agreement only in its line
    monkeypatch.setattr(quantize, "RECIPES", RECIPES[1:])
    lines.clear()
    unlabelled = evaluation_images(root, [])
    record = quantize.build_int8(model, artifact, tmp_path / "second", unlabelled, "t", log=lines.append)
    assert _patch_embedding_inputs(tmp_path / "second" / INT8_FILE) == ["Parameter", "Constant"]
    assert lines == [f"int8 ({RECIPES[1][0]}): top-1 agreement with fp32 {record['agreement_top1']:.2%} on "
                     f"{record['images']} images"]
