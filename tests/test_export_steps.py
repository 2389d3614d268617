"""vit-export's steps in this process, on the tiny model: which images it measures on, the temperature
and reference it records, the int8 record's ECEs, and the errors that stop it before anything is saved.
The whole command (a real model store, a served export) is tested through vit-export subprocesses in
test_calibration.py, test_int8.py and test_onnx.py; these reach the same code where mutation testing
(scripts/mutation.py) can follow it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.service_fixtures import CLASS_NAMES, build_tiny_model, picture
from training import export
from vit_service.artifact import ModelArtifact, load_model
from vit_service.calibration import ece, reference_record, softmax
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.quantize import evaluation_images, image_logits


def _images(root: Path, per_class: int = 2, loose: int = 0) -> Path:
    for c, name in enumerate(CLASS_NAMES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            picture(10 * c + i, (40, 40)).save(root / name / f"{i}.jpg", quality=90)
    for i in range(loose):
        picture(90 + i).save(root / f"loose{i}.jpg", quality=90)
    return root


def _args(**given: object) -> argparse.Namespace:
    return argparse.Namespace(**{"calib": None, "calib_limit": 2000, **given})


@pytest.fixture(autouse=True)
def model_store(tmp_path: Path):
    """A real BentoML model store under tmp_path for each test: BentoML's own dependency-injection override
    (simple_di's `patch`, as BentoML's tests use it), since this process's BentoML home is fixed once read.
    Every test of the file has it, so no export reaches the user's store (not even a mutant's, which
    may pass where the code would refuse)."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    store = ModelStore(tmp_path / "store")
    with BentoMLContainer.model_store.patch(store):
        yield store


def test_measurement_images_from_calib_or_the_runs_validation_folder(tmp_path: Path) -> None:
    _, artifact = build_tiny_model()
    root = _images(tmp_path / "val", per_class=3)
    every = evaluation_images(root, CLASS_NAMES)
    assert export._measurement_images(artifact, _args(calib=str(root))) == (str(root), every)
    assert export._measurement_images(artifact, _args(calib=str(root), calib_limit=5)) == (str(root), every[:5])
    assert export._measurement_images(artifact, _args(calib=str(root), calib_limit=0)) == (str(root), every)
    assert export._measurement_images(artifact, _args()) == (None, [])  # no --calib, no recorded folder
    artifact.metadata = {**artifact.metadata, "dataset": {"val_dir": str(root)}}
    assert export._measurement_images(artifact, _args(calib_limit=4)) == (str(root), every[:4])
    artifact.metadata["dataset"] = {"val_dir": str(tmp_path / "moved")}  # recorded, but not on this machine
    assert export._measurement_images(artifact, _args()) == (None, [])


def test_calibrate_records_the_temperature_and_the_served_reference(tmp_path: Path, capsys) -> None:
    model, artifact = build_tiny_model()
    root = _images(tmp_path / "val", per_class=3, loose=2)
    found = evaluation_images(root, CLASS_NAMES)
    top = image_logits(model, artifact.preprocessing, found)[0].argmax(1)
    # labels the random model gets right 3 times in 4 (the folders' would give T at its bound), loose ones kept
    images = [(p, None if y is None else int(k if i % 4 else (k + 1) % 4))
              for i, ((p, y), k) in enumerate(zip(found, top))]
    export._calibrate(model, artifact, str(root), images)
    logits, labels = image_logits(model, artifact.preprocessing, images)
    known = labels >= 0
    c = artifact.calibration
    assert c["images"] == int(known.sum()) == 12 and c["source"] == str(root.resolve()) and c["bins"] == 15
    assert c["ece_before"] == round(ece(softmax(logits[known]), labels[known], 15), 6)
    assert c["ece_after"] == round(ece(softmax(logits[known], c["temperature"]), labels[known], 15), 6)
    assert artifact.reference == reference_record(logits, c["temperature"])  # all 14 images, scores as served
    lines = capsys.readouterr().err.splitlines()
    assert 0.05 < c["temperature"] < 20.0  # within its bounds: no question about the training
    assert lines[0] == (f"calibration: T={c['temperature']:.2f} on 12 images, ECE {c['ece_before']:.3f} -> "
                        f"{c['ece_after']:.3f}, NLL {c['nll_before']:.2f} -> {c['nll_after']:.2f}")
    assert lines[1] == "reference: served scores on 14 images recorded"


def test_calibrate_without_labels_records_the_plain_softmax(tmp_path: Path, capsys) -> None:
    model, artifact = build_tiny_model()
    root = _images(tmp_path / "val", per_class=1)
    images = [(path, None) for path, _ in evaluation_images(root, CLASS_NAMES)]
    export._calibrate(model, artifact, str(root), images)
    logits, _ = image_logits(model, artifact.preprocessing, images)
    assert artifact.calibration is None and artifact.reference == reference_record(logits, 1.0)
    assert capsys.readouterr().err.splitlines() == [
        f"calibration: none (no labels: no folder of {root} is named like a class of the model); scores are the "
        "plain softmax",
        "reference: served scores on 4 images recorded (plain softmax, T = 1: no calibration)"]


def test_calibrate_without_images_says_why(tmp_path: Path, capsys) -> None:
    model, artifact = build_tiny_model()
    export._calibrate(model, artifact, None, [])
    artifact.metadata = {**artifact.metadata, "dataset": {"val_dir": "/data/val"}}
    export._calibrate(model, artifact, None, [])
    assert artifact.calibration is None and artifact.reference is None
    assert capsys.readouterr().err.splitlines() == [
        "calibration: none (no images: the model records no validation folder; give --calib DIR with class "
        "folders to fit a temperature); scores are the plain softmax",
        "calibration: none (the run's validation folder /data/val is not there; give --calib DIR with class "
        "folders to fit a temperature); scores are the plain softmax"]


def test_a_temperature_at_its_bound_asks_whether_the_model_is_trained(tmp_path: Path, capsys) -> None:
    model, artifact = build_tiny_model()
    root = _images(tmp_path / "val", per_class=1)
    paths = [path for path, _ in evaluation_images(root, CLASS_NAMES)]
    logits, _ = image_logits(model, artifact.preprocessing, [(p, None) for p in paths])
    wrong = [(p, int(k + 1) % 4) for p, k in zip(paths, logits.argmax(1))]  # every label other than the top class
    export._calibrate(model, artifact, str(root), wrong)
    t = artifact.calibration["temperature"]
    line = capsys.readouterr().err.splitlines()[0]
    assert t == 20.0 and line.endswith(" (T held at its bound 20: the NLL wants it further; is the model trained?)")


def test_int8_export_without_images_names_what_to_give() -> None:
    model, artifact = build_tiny_model()
    with pytest.raises(export.ExportError, match=r"^--int8 calibrates the int8 model and measures it against fp32 "
                                                 r"on real images: give --calib DIR \(images, in class folders"):
        export._build_int8(model, artifact, Path("unused"), None, [])
    artifact.metadata = {**artifact.metadata, "dataset": {"val_dir": "/data/val"}}
    with pytest.raises(export.ExportError, match=r"^--int8: the run's validation folder /data/val is not there to "
                                                 r"calibrate int8 on; give --calib DIR$"):
        export._build_int8(model, artifact, Path("unused"), None, [])


def test_the_command_refuses_wrong_sources_before_saving_anything(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        export.main([])
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == (
        "vit-export: error: give one of --ckpt (a vit-train checkpoint), --run (a vit-train run folder: its best "
        "checkpoint) or --from (a pretrained model)")
    with pytest.raises(SystemExit):
        export.main(["--ckpt", "a.ckpt", "--from", "b"])
    assert "give one of --ckpt" in capsys.readouterr().err
    model, artifact = build_tiny_model()
    backbone = VisionTransformer(dataclasses.replace(artifact.config, num_classes=0))
    dataclasses.replace(artifact, config=backbone.config, class_names=[]).save(backbone, tmp_path / "backbone")
    assert export.main(["--from", str(tmp_path / "backbone")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"vit-export: error: {tmp_path / 'backbone'} has no classification head (a backbone): nothing to serve; "
        "fine-tune it with vit-train --model.init_from instead")
    artifact.save(model, tmp_path / "tiny")
    assert export.main(["--from", str(tmp_path / "tiny"), "--int8", "--calib", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"vit-export: error: {tmp_path / 'nowhere'}: image "
                                                               "folder not found")
    assert export.main(["--from", str(tmp_path / "tiny"), "--int8"]) == 2  # no images to calibrate int8 on
    assert "give --calib DIR" in capsys.readouterr().err.splitlines()[-1]


# --- the whole command in this process, into a real model store in a temporary folder ------------------------

def _tiny_folder(tmp_path: Path, **metadata: object) -> Path:
    model, artifact = build_tiny_model()
    artifact.metadata = {**artifact.metadata, **metadata}
    return artifact.save(model, tmp_path / "tiny")


def test_export_writes_the_store_the_folder_and_onnx_and_says_where(tmp_path: Path, model_store, capsys) -> None:
    import bentoml

    source = _tiny_folder(tmp_path, val_acc1=0.75, val_images=10, val_images_total=10)
    images = _images(tmp_path / "calib")
    assert export.main(["--from", str(source), "--name", "tiny-x", "--dir", str(tmp_path / "out"), "--onnx",
                        "--calib", str(images)]) == 0
    out, err = capsys.readouterr()
    [model] = bentoml.models.list("tiny-x")
    assert out == f"{model.tag}\n"
    stored = Path(model.path)
    for folder in (stored, tmp_path / "out"):
        assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "vit_artifact.json", "model.onnx"}
        assert ModelArtifact.read(folder).calibration["images"] == 8
    assert err.splitlines()[-3:] == [
        f"exported {source} (4 classes, val top-1 0.7500) as {model.tag}",
        f"model folder: {tmp_path / 'out' / 'model.safetensors'}, vit_artifact.json",
        f"onnx: {stored / 'model.onnx'}, {tmp_path / 'out' / 'model.onnx'}"]


def test_export_says_on_how_many_val_images_the_accuracy_was_measured(tmp_path: Path, model_store, capsys) -> None:
    source = _tiny_folder(tmp_path, val_acc1=0.5, val_images=6, val_images_total=12)
    assert export.main(["--from", str(source), "--name", "tiny-y"]) == 0
    out, err = capsys.readouterr()
    assert f"exported {source} (4 classes, val top-1 0.5000 on 6 of 12 val images) as {out.strip()}" in err
    assert "model folder:" not in err and "onnx:" not in err and "note:" not in err
    import bentoml

    stored = Path(bentoml.models.get(out.strip()).path)
    assert not (stored / "model.onnx").exists() and not (stored / "model.int8.xml").exists()  # only when asked
    (source / "vit_artifact.json").write_text((source / "vit_artifact.json").read_text().replace('"val_acc1"', '"x"'))
    assert export.main(["--from", str(source), "--name", "tiny-y"]) == 0
    out, err = capsys.readouterr()
    assert f"exported {source} (4 classes) as {out.strip()}" in err


def test_an_exported_folders_records_are_made_again_not_copied(tmp_path: Path, model_store, capsys) -> None:
    import bentoml

    model, artifact = build_tiny_model()
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model.int8.xml").write_text("<old/>")
    artifact.int8 = {"file": "model.int8.xml", "agreement_top1": 1.0}
    artifact.calibration = {"temperature": 3.0}
    artifact.reference = {"images": 1}
    artifact.save(model, tmp_path / "tiny")
    assert export.main(["--from", str(tmp_path / "tiny"), "--name", "tiny-z"]) == 0
    [stored] = bentoml.models.list("tiny-z")
    read = ModelArtifact.read(Path(stored.path))
    assert (read.int8, read.calibration, read.reference) == (None, None, None)
    assert not (Path(stored.path) / "model.int8.xml").exists()


def test_int8_export_puts_the_int8_model_beside_the_weights_with_its_ece(tmp_path: Path, capsys,
                                                                         monkeypatch) -> None:
    import bentoml

    from vit_service import quantize

    monkeypatch.setattr(quantize, "RECIPES", quantize.RECIPES[:1])  # one NNCF run is enough here
    monkeypatch.setattr(export, "MIN_AGREEMENT", 1.01)  # a guard no int8 model meets: the warning
    source = _tiny_folder(tmp_path)
    images = _images(tmp_path / "calib", per_class=2, loose=1)
    assert export.main(["--from", str(source), "--name", "tiny-8", "--int8", "--calib", str(images),
                        "--dir", str(tmp_path / "out"), "--onnx"]) == 0
    err = capsys.readouterr().err.splitlines()
    [stored] = bentoml.models.list("tiny-8")
    for folder in (Path(stored.path), tmp_path / "out"):
        read = ModelArtifact.read(folder)
        assert read.int8["file"] == "model.int8.xml" and read.int8["images"] == 9
        assert read.int8["measured_on"] == str(images.resolve())
        assert (folder / "model.int8.xml").is_file() and (folder / "model.int8.bin").is_file()
        assert (folder / "model.onnx").is_file()  # --onnx and --int8 together: both
    record, calibration = read.int8, read.calibration
    assert (f"vit-export: warning: int8 agrees with fp32 on only {record['agreement_top1']:.2%} of the images "
            "(< 101%): recorded, but it will not serve (VIT_PRECISION=auto passes it over and VIT_PRECISION=int8 "
            "refuses to start); more or other --calib images may help") in err
    # the int8 model's ECE before and after the fp32 model's temperature, on the labelled images
    labelled = [(p, y) for p, y in evaluation_images(images, CLASS_NAMES) if y is not None]
    int8_file = tmp_path / "out" / "model.int8.xml"
    logits, labels = quantize.int8_logits(int8_file, read.preprocessing, labelled)
    t = calibration["temperature"]
    assert calibration["int8"] == {"ece_before": round(ece(softmax(logits), labels, 15), 6),
                                   "ece_after": round(ece(softmax(logits, t), labels, 15), 6)}
    assert len(labels) == 8 and calibration["int8"]["ece_before"] != calibration["int8"]["ece_after"]
    assert (f"calibration (int8): ECE {calibration['int8']['ece_before']:.3f} -> "
            f"{calibration['int8']['ece_after']:.3f} with the same T") in err
    assert (f"int8 (NNCF TRANSFORMER): top-1 agreement with fp32 {record['agreement_top1']:.2%} on 9 images; "
            f"top-1 fp32 {record['fp32_top1']:.2%}, int8 {record['int8_top1']:.2%}") in err
    # no fp32 temperature, or no labelled image: nothing to add
    before = dict(read.calibration)
    export._int8_calibration(read, int8_file, [(p, None) for p, _ in labelled])
    assert read.calibration == before
    uncalibrated = dataclasses.replace(read, calibration=None)
    export._int8_calibration(uncalibrated, int8_file, labelled)
    assert uncalibrated.calibration is None
    # an agreement exactly at the guard serves (int8_guard refuses only below it): no warning
    monkeypatch.setattr(export, "MIN_AGREEMENT", record["agreement_top1"])
    again = export._build_int8(load_model(tmp_path / "out")[0], read, tmp_path / "again", str(images), labelled[:4])
    assert again["agreement_top1"] == record["agreement_top1"]  # (the tiny model's int8 agrees on every image)
    assert "warning" not in capsys.readouterr().err


def test_the_same_weights_exported_again_get_a_new_tag_and_a_note(tmp_path: Path, model_store, capsys) -> None:
    import bentoml

    source = _tiny_folder(tmp_path, source_checkpoint=str(tmp_path / "a.ckpt"), source_checkpoint_mtime=1.5,
                          weights="raw")
    tags = []
    for _ in range(3):
        assert export.main(["--from", str(source), "--name", "tiny-n"]) == 0
        tags.append(capsys.readouterr())
    first, second, third = (out.strip() for out, _ in tags)
    assert len({first, second, third}) == 3 and len(bentoml.models.list("tiny-n")) == 3
    assert "note:" not in tags[0][1]
    assert tags[2][1].splitlines()[-1] == (
        f"note: the same weights were exported before as {second}, {first}; each vit-export makes a new tag "
        f"(remove one with: bentoml models delete {second})")
    assert export.main(["--from", str(source), "--name", "tiny-m"]) == 0  # another name: its own history
    assert "note:" not in capsys.readouterr().err
    other = _tiny_folder(tmp_path / "o", source_checkpoint=str(tmp_path / "a.ckpt"), source_checkpoint_mtime=2.5,
                         weights="raw")  # the checkpoint file changed since: not the same weights
    assert export.main(["--from", str(other), "--name", "tiny-n"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_hf_dir_is_written_last_and_a_model_it_cannot_express_is_skipped(tmp_path: Path, model_store,
                                                                         capsys) -> None:
    import bentoml

    source = _tiny_folder(tmp_path)
    assert export.main(["--from", str(source), "--name", "tiny-h", "--hf-dir", str(tmp_path / "hf")]) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "hf" / "config.json").is_file() and f"transformers folder: {tmp_path / 'hf'}" in err
    model, artifact = build_tiny_model()
    avg = VisionTransformer(dataclasses.replace(artifact.config, global_pool="avg"))
    dataclasses.replace(artifact, config=avg.config).save(avg, tmp_path / "avg")
    code = export.main(["--from", str(tmp_path / "avg"), "--name", "tiny-avg", "--hf-dir", str(tmp_path / "hf2"),
                        "--dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == export.HF_DIR_SKIPPED == 3 and not (tmp_path / "hf2").exists()
    assert len(bentoml.models.list("tiny-avg")) == 1 and (tmp_path / "out" / "model.safetensors").is_file()
    assert out.strip() == str(bentoml.models.list("tiny-avg")[0].tag)
    assert err.splitlines()[-1].startswith(f"vit-export: skipped --hf-dir {tmp_path / 'hf2'}: ")
    assert err.splitlines()[-1].endswith("; everything else was written (exit 3)")


def _run_folder(root: Path, scores: dict[str, float]) -> Path:
    """A vit-train run folder laid by hand as vit-train writes one: checkpoints carrying the model's config,
    hyper-parameters and weights, and Lightning's ModelCheckpoint state with each kept file's score."""
    model, artifact = build_tiny_model()
    ckpt_dir = root / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    key = "ModelCheckpoint{'monitor': 'val/acc1', 'mode': 'max', 'every_n_train_steps': 0}"
    for step, name in enumerate(scores, start=1):
        torch.save({"hyper_parameters": {"preset": "tiny", "num_classes": 4, "class_names": CLASS_NAMES,
                                         "preprocessing": artifact.preprocessing.to_dict()},
                    "model_config": artifact.config.to_dict(),
                    "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                    "callbacks": {key: {"best_k_models": {str(ckpt_dir / n): s for n, s in scores.items()}}},
                    "global_step": step, "epoch": step, "vit_service": {"val_acc1": scores[name]}},
                   ckpt_dir / name)
    return root


def test_export_run_takes_the_best_checkpoint_and_says_which(tmp_path: Path, capsys) -> None:
    import bentoml

    run = _run_folder(tmp_path / "version_0", {"best-a.ckpt": 0.5, "best-b.ckpt": 0.75, "last.ckpt": 0.25})
    assert export.main(["--run", str(run)]) == 0  # no --name: the service's default model name
    out, err = capsys.readouterr()
    [stored] = bentoml.models.list("vit-classifier")
    chosen = (run / "checkpoints" / "best-b.ckpt").resolve()
    assert out.strip() == str(stored.tag)
    assert f"best checkpoint of {run} by val/acc1 (max): best-b.ckpt (val/acc1 0.7500)" in err.splitlines()
    assert err.splitlines()[-1] == f"exported {chosen} (4 classes, val top-1 0.7500) as {stored.tag}"
    assert ModelArtifact.read(stored.path).metadata["source_checkpoint"] == str(chosen)


def test_export_ckpt_reads_the_checkpoint_given(tmp_path: Path, capsys) -> None:
    run = _run_folder(tmp_path / "version_0", {"best-a.ckpt": 0.5, "last.ckpt": 0.25})
    assert export.main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--name", "ck"]) == 0
    assert " (4 classes, val top-1 0.2500) as ck:" in capsys.readouterr().err
    assert export.main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--ema", "--name", "ck"]) == 2
    assert "has no EMA weights" in capsys.readouterr().err


def test_export_a_bare_weight_file_with_its_timm_architecture(tmp_path: Path, capsys) -> None:
    import timm

    torch.manual_seed(0)
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(timm_model.state_dict(), tmp_path / "weights.pth")
    assert export.main(["--from", str(tmp_path / "weights.pth"), "--name", "bare"]) == 2
    assert "give its architecture (--arch" in capsys.readouterr().err
    assert export.main(["--from", str(tmp_path / "weights.pth"), "--arch", "vit_tiny_patch16_224",
                        "--name", "bare", "--dir", str(tmp_path / "out")]) == 0
    model, _ = load_model(tmp_path / "out")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model.eval()(x), rtol=1e-4, atol=1e-4)


def test_export_leaves_no_temporary_files(tmp_path: Path, capsys, monkeypatch) -> None:
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert export.main(["--from", str(_tiny_folder(tmp_path)), "--onnx", "--name", "tmp-check"]) == 0
    assert list(scratch.iterdir()) == []
    assert export.main(["--from", str(tmp_path / "nowhere"), "--onnx"]) == 2  # nor when it fails
    assert list(scratch.iterdir()) == []
