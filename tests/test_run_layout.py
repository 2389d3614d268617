"""Every output follows --trainer.default_root_dir, one folder per run (version_N), nothing in the
current directory; resume with --ckpt_path last; vit-export --run picks the best checkpoint;
vit-train predict writes one row per image. All through the real CLIs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import demo_config, reference_eval_transform, run_cli_in_process
from training.module import ViTClassifier

# Monitoring elapsed time (mode min) makes the first epoch the "best" one for certain, so the best
# checkpoint and last.ckpt differ whatever the accuracy does in a two-epoch run.
BEST_IS_FIRST = ["--checkpoint.monitor", "time/elapsed_min", "--checkpoint.mode", "min"]


@pytest.fixture(scope="module")
def runs(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two fits from an empty working directory, into two different default_root_dirs."""
    cwd = tmp_path_factory.mktemp("empty_cwd")
    config = demo_config(tmp_path_factory.mktemp("config"), demo_data)
    roots = {name: tmp_path_factory.mktemp(name) / "out" for name in ("a", "b")}
    outputs = {}
    for name, epochs, extra in (("a", "2", []), ("b", "1", ["--progress.every_n_steps", "1"])):
        result = run_cli_in_process("vit-train", "fit", "--config", str(config), "--trainer.default_root_dir",
                                    str(roots[name]), "--trainer.max_epochs", epochs, *BEST_IS_FIRST, *extra, cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = result.stdout
    return {"cwd": cwd, "config": config, "roots": roots, "stdout": outputs}


def test_two_runs_write_only_under_their_own_root(runs: dict) -> None:
    assert list(runs["cwd"].iterdir()) == []  # nothing written to the current directory
    for name, epochs in (("a", 2), ("b", 1)):
        root = runs["roots"][name]
        assert sorted(p.name for p in root.iterdir()) == ["version_0"]
        run = root / "version_0"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["trainer"]["default_root_dir"] == str(root)
        assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents.*"))
        last = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
        assert last["epoch"] == epochs - 1
        state = next(v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint"))
        assert Path(state["dirpath"]) == run / "checkpoints"
        # stdout is not a terminal here: one progress line per epoch
        assert f"epoch {epochs - 1}/{epochs - 1}  step" in runs["stdout"][name]  # numbered from 0
    assert "] step 1  train/loss " in runs["stdout"]["b"] and "] step 1 " not in runs["stdout"]["a"]


@pytest.mark.slow  # two fits with validation (~70 s); test_newcomer_walk.py's --ckpt_path best test stays fast
def test_ckpt_path_best_picks_the_best_checkpoint_not_the_last(runs: dict, demo_data: Path, tmp_path: Path) -> None:
    # A copy of run "a" (best: epoch 0, last: epoch 1), so the shared folder stays as fit left it.
    root = tmp_path / "root"
    shutil.copytree(runs["roots"]["a"] / "version_0", root / "version_0")
    ckpts = root / "version_0/checkpoints"
    (best,) = ckpts.glob("best-epoch000-*.ckpt")
    recorded = {p: torch.load(p, map_location="cpu", weights_only=False)["vit_service"] for p in (best, ckpts / "last.ckpt")}
    # Precondition: the two checkpoints score differently, so the one used is visible.
    assert recorded[best]["val_loss"] != recorded[ckpts / "last.ckpt"]["val_loss"]
    common = ["--config", str(runs["config"]), "--trainer.default_root_dir", str(root), "--ckpt_path", "best"]

    val = run_cli_in_process("vit-train", "validate", *common, cwd=runs["cwd"])
    assert val.returncode == 0, val.stderr[-3000:]
    rows = list(csv.DictReader((root / "version_1/metrics.csv").open()))
    assert [float(r["val/loss"]) for r in rows if r.get("val/loss")] == [pytest.approx(recorded[best]["val_loss"], abs=1e-5)]

    test = run_cli_in_process("vit-train", "test", *common, "--data.test_dir", str(demo_data / "val"), cwd=runs["cwd"])
    assert test.returncode == 0, test.stderr[-3000:]
    rows = list(csv.DictReader((root / "version_2/metrics.csv").open()))
    assert [float(r["test/loss"]) for r in rows if r.get("test/loss")] == [pytest.approx(recorded[best]["val_loss"], abs=1e-5)]

    # predict: every row's labels and scores are the best checkpoint's model on that image (top-1
    # = its argmax), computed here with the module and a PIL + torchvision eval transform.
    images = sorted((demo_data / "val").glob("*/*.jpg"))[::3]
    pred = run_cli_in_process("vit-train", "predict", *common, "--data.predict_dir", str(demo_data / "val"),
                              cwd=runs["cwd"])
    assert pred.returncode == 0, pred.stderr[-3000:]
    rows = {r["path"]: r for r in csv.DictReader((root / "version_3/predictions.csv").open())}
    assert len(rows) == len(list((demo_data / "val").glob("*/*.jpg")))
    hp = torch.load(best, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    x = torch.stack([reference_eval_transform(p, hp["image_size"], hp["mean"], hp["std"]) for p in images])
    probs = {}
    for ckpt in (best, ckpts / "last.ckpt"):
        module = ViTClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
        with torch.no_grad():
            probs[ckpt] = module(x).softmax(-1)
    names = module.hparams.class_names
    for i, path in enumerate(images):
        row = rows[str(path)]
        top = probs[best][i].topk(5)
        assert [row[f"label_{k + 1}"] for k in range(5)] == [names[j] for j in top.indices.tolist()], path
        assert [float(row[f"score_{k + 1}"]) for k in range(5)] == pytest.approx(top.values.tolist(), abs=1e-4)
    # ... and not last.ckpt's: its scores differ on these images.
    assert (probs[best] - probs[ckpts / "last.ckpt"]).abs().max() > 1e-3


def test_resume_last_continues_the_latest_run_in_its_folder(runs: dict) -> None:
    root = runs["roots"]["a"]
    rows_before = list(csv.DictReader((root / "version_0/metrics.csv").open()))
    result = run_cli_in_process("vit-train", "fit", "--config", str(runs["config"]), "--trainer.default_root_dir",
                                str(root), "--trainer.max_epochs", "3", "--ckpt_path", "last", *BEST_IS_FIRST,
                                cwd=runs["cwd"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == ["version_0"]  # no new run folder
    last = torch.load(root / "version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2
    rows_after = list(csv.DictReader((root / "version_0/metrics.csv").open()))
    assert len(rows_after) > len(rows_before)  # the earlier epochs' metrics are kept
    assert {r["epoch"] for r in rows_after if r.get("val/acc1")} == {"0", "1", "2"}
    assert list(runs["cwd"].iterdir()) == []


def test_export_run_picks_the_best_checkpoint_not_the_last(runs: dict, tmp_path: Path) -> None:
    run = runs["roots"]["a"] / "version_0"
    result = run_cli_in_process("vit-export", "--run", str(run), "--name", "best-test", "--dir", str(tmp_path / "model"),
                     env={"BENTOML_HOME": str(tmp_path / "bentoml")}, cwd=runs["cwd"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "by time/elapsed_min (min): best-epoch000-" in result.stderr
    metadata = yaml.safe_load((tmp_path / "model/vit_artifact.json").read_text())["metadata"]
    assert metadata["epoch"] == 0 and Path(metadata["source_checkpoint"]).name.startswith("best-epoch000-")
    assert list(runs["cwd"].iterdir()) == []


def test_export_run_without_checkpoints_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli_in_process("vit-export", "--run", str(tmp_path), env={"BENTOML_HOME": str(tmp_path / "b")})
    assert result.returncode == 2 and "no checkpoints" in result.stderr and str(tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


def test_predict_writes_one_row_per_image_and_names_unreadable_files(runs: dict, demo_data: Path,
                                                                        tmp_path: Path) -> None:
    images = tmp_path / "unlabeled"
    (images / "nested").mkdir(parents=True)
    sources = sorted((demo_data / "val").glob("*/*.jpg"))[::4]
    for i, src in enumerate(sources):
        (images / ("nested" if i % 2 else "") / f"img{i}.jpg").write_bytes(src.read_bytes())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    root = runs["roots"]["b"]
    result = run_cli_in_process("vit-train", "predict", "--config", str(runs["config"]), "--trainer.default_root_dir",
                                str(root), "--data.predict_dir", str(images), "--ckpt_path", "best",
                                "--predict_writer.top_k", "3", "--data.batch_size", "4", cwd=runs["cwd"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = root / "version_1/predictions.csv"  # a new run folder, with its config beside the rows
    assert (root / "version_1/config.yaml").is_file()
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    assert len(rows) == len(sources) + 1
    broken = rows.pop(str(images / "broken.jpg"))
    assert broken["error"] and not broken["label_1"]
    assert "broken.jpg" in result.stdout
    class_names = sorted(p.name for p in (demo_data / "train").iterdir())
    for row in rows.values():
        assert not row["error"] and {row[f"label_{k}"] for k in (1, 2, 3)} <= set(class_names)
        scores = [float(row[f"score_{k}"]) for k in (1, 2, 3)]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-5
    assert list(runs["cwd"].iterdir()) == []

    jsonl = run_cli_in_process("vit-train", "predict", "--config", str(runs["config"]), "--trainer.default_root_dir",
                               str(root), "--data.predict_dir", str(images), "--ckpt_path", "last",
                               "--predict_writer.format", "jsonl", cwd=runs["cwd"])
    assert jsonl.returncode == 0, jsonl.stderr[-3000:]
    records = [json.loads(line) for line in (root / "version_2/predictions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == sorted([str(images / "broken.jpg"), *rows])
    for record in records:
        if record["path"].endswith("broken.jpg"):
            assert record["error"] and "predictions" not in record
        else:
            assert len(record["predictions"]) == 5 and record["predictions"][0]["label"] in class_names
