"""README promises of the training CLIs, through the real `vit-train` / `vit-export` commands:
validate and test, the best checkpoint, `--data.val_fraction`, the `data/skipped_files` metric,
`vit-export --dir`. Every run writes under its own tmp folder (demo_config), never into the
shared `trained_run` folder."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from tests.conftest import demo_config, reference_eval_transform, run_cli_in_process
from training.cli import ViTCLI
from training.data import ImageFolderDataModule
from training.folder_dataset import DatasetError
from training.module import ViTClassifier
from vit_service.artifact import load_model


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    """The CSV metrics of a run folder (version_N), or of the newest run under a default_root_dir."""
    files = [run_dir / "metrics.csv"] if (run_dir / "metrics.csv").exists() else \
        sorted(run_dir.glob("version_*/metrics.csv"), key=lambda f: int(f.parent.name.split("_")[1]))
    assert files, f"no metrics.csv under {run_dir}"
    with files[-1].open() as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def _recorded(ckpt_path: Path) -> dict[str, float]:
    """The val metrics the training run recorded in a checkpoint when it saved it."""
    return torch.load(ckpt_path, map_location="cpu", weights_only=False)["vit_service"]


def test_best_checkpoint_is_the_best_epoch(trained_run: Path) -> None:
    val_acc = _column(_metrics(trained_run), "val/acc1")
    assert len(val_acc) == 2
    # Precondition: the epochs differ, so keeping the max (not the min, not the last) is visible.
    assert val_acc[0] != val_acc[1], val_acc
    (best,) = (trained_run / "checkpoints").glob("best-*.ckpt")
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert ckpt["vit_service"]["val_acc1"] == pytest.approx(max(val_acc), abs=1e-6)
    assert val_acc[ckpt["epoch"]] == pytest.approx(max(val_acc), abs=1e-6)  # saved at that epoch
    name_acc = float(re.search(r"acc([0-9.]+)\.ckpt$", best.name).group(1))
    assert name_acc == pytest.approx(max(val_acc), abs=1e-4)


def test_validate_reproduces_the_recorded_val_metrics(trained_run: Path, demo_data: Path, tmp_path: Path) -> None:
    last = trained_run / "checkpoints/last.ckpt"
    result = run_cli_in_process("vit-train", "validate", "--config", str(demo_config(tmp_path, demo_data)),
                                "--ckpt_path", str(last))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _metrics(tmp_path)
    recorded = _recorded(last)
    assert _column(rows, "val/acc1") == [pytest.approx(recorded["val_acc1"], abs=1e-6)]
    assert _column(rows, "val/loss") == [pytest.approx(recorded["val_loss"], abs=1e-5)]


def test_test_needs_and_uses_test_dir(trained_run: Path, demo_data: Path, tmp_path: Path) -> None:
    last = trained_run / "checkpoints/last.ckpt"
    config = demo_config(tmp_path, demo_data)
    missing = run_cli_in_process("vit-train", "test", "--config", str(config), "--ckpt_path", str(last))
    assert missing.returncode == 2
    assert "vit-train: error: `vit-train test` needs --data.test_dir" in missing.stderr
    assert "Traceback" not in missing.stderr

    # The val folder as the test set: the test metrics must be the recorded val metrics.
    result = run_cli_in_process("vit-train", "test", "--config", str(config), "--ckpt_path", str(last),
                                "--data.test_dir", str(demo_data / "val"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _metrics(tmp_path)
    recorded = _recorded(last)
    assert _column(rows, "test/acc1") == [pytest.approx(recorded["val_acc1"], abs=1e-6)]
    assert _column(rows, "test/acc5") == [pytest.approx(recorded["val_acc5"], abs=1e-6)]
    # `vit-train test` writes report-test/ into its own run folder, over the test images.
    (report,) = tmp_path.glob("version_*/report-test")
    assert f"evaluation report: {report / 'README.md'}" in result.stdout
    summary = json.loads((report / "summary.json").read_text())
    assert summary["images"] == len(list((demo_data / "val").rglob("*.jpg")))
    assert summary["accuracy"] == pytest.approx(recorded["val_acc1"], abs=1e-6)
    assert not list(tmp_path.glob("version_*/report-validate"))


def test_val_fraction_holds_out_part_of_train(demo_data: Path, tmp_path: Path) -> None:
    # Parsed by the real CLI (no subcommand: build the objects, run nothing).
    cli = ViTCLI(ViTClassifier, ImageFolderDataModule, run=False, args=[
        "--config", str(demo_config(tmp_path, demo_data)), "--data.val_dir", "null", "--data.val_fraction", "0.25",
    ])
    dm = cli.datamodule
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert isinstance(train, Subset) and isinstance(val, Subset)
    n_files = len(list((demo_data / "train").glob("*/*.jpg")))
    assert (len(train), len(val)) == (n_files - n_files // 4, n_files // 4)  # 72 images: 54 / 18
    assert not set(train.indices) & set(val.indices)
    assert val.dataset.root == train.dataset.root == str(demo_data / "train")
    # Held-out images get the eval transform, computed here with PIL and torchvision on the same
    # file, decoded as serving decodes (JPEG draft scaling to >= 64 px, then resize the shorter
    # side to 64 bicubic, centre crop 64, normalise); the rest get the random train transform.
    hp = dm.hparams
    assert (hp.image_size, hp.crop_pct) == (64, 1.0)

    def plain_eval(path: str) -> torch.Tensor:
        return reference_eval_transform(path, 64, hp.mean, hp.std)

    # Precondition: some held-out files are >= 128 px, so JPEG draft decoding (half scale) is in play.
    assert any(min(Image.open(val.dataset.samples[i][0]).size) >= 128 for i in val.indices)
    for i in range(len(val)):
        path, label = val.dataset.samples[val.indices[i]]
        expected = plain_eval(path)
        image, got_label = val[i]
        assert got_label == label
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-5)
    untouched = plain_eval(train.dataset.samples[train.indices[0]][0])
    first, second = train[0][0], train[0][0]
    assert not torch.equal(first, second)  # random: two reads differ
    assert not torch.allclose(first, untouched, atol=1e-3)  # and neither is the plain eval image
    assert sorted(val.indices) != list(range(len(val)))  # a random subset, not the first files


def test_a_minimal_data_config_trains_with_timm_s_preprocessing_and_deit_s_augmentations(demo_data: Path) -> None:
    """The defaults a config that names only the folders gets: timm's ImageNet eval preprocessing and
    training transform, DeiT's RandAugment and random erasing (Touvron et al. 2021), a tenth held
    out, a data-loading process per core."""
    import inspect

    from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.data.transforms_factory import transforms_imagenet_train

    from vit_service.host import host_cores

    timm_train = {k: p.default for k, p in inspect.signature(transforms_imagenet_train).parameters.items()}
    dm = ImageFolderDataModule(str(demo_data / "train"))
    hp = dm.hparams
    assert (hp.image_size, hp.crop_pct, hp.interpolation) == (timm_train["img_size"], DEFAULT_CROP_PCT, "bicubic")
    assert (tuple(hp.mean), tuple(hp.std)) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert (tuple(hp.scale), tuple(hp.ratio)) == ((0.08, 1.0), (3 / 4, 4 / 3))  # timm's when given none
    assert (hp.hflip, hp.color_jitter) == (timm_train["hflip"], timm_train["color_jitter"])
    assert (hp.auto_augment, hp.re_prob) == ("rand-m9-mstd0.5-inc1", 0.25)  # DeiT's
    assert (hp.val_fraction, hp.batch_size, hp.seed, hp.pin_memory, hp.in_memory) == (0.1, 64, 42, True, False)
    assert dm.num_workers == host_cores()


def test_the_training_transform_takes_every_data_option_from_the_command_line(demo_data: Path,
                                                                               tmp_path: Path) -> None:
    """Each of timm's training-transform options a user sets reaches the transform (none of them the default)."""
    cli = ViTCLI(ViTClassifier, ImageFolderDataModule, run=False, args=[
        "--config", str(demo_config(tmp_path, demo_data)), "--data.scale", "[0.5, 0.9]", "--data.ratio", "[0.9, 1.1]",
        "--data.hflip", "0.3", "--data.color_jitter", "0.2", "--data.interpolation", "nearest",  # timm: bilinear
        "--data.mean", "[0.1, 0.2, 0.3]", "--data.std", "[0.4, 0.5, 0.6]",
    ])
    steps = {type(t).__name__: t for t in cli.datamodule.train_transform().transforms}
    crop = steps["RandomResizedCropAndInterpolation"]
    assert (crop.scale, crop.ratio, crop.interpolation.value) == ((0.5, 0.9), (0.9, 1.1), "nearest")
    assert steps["RandomHorizontalFlip"].p == 0.3
    assert steps["ColorJitter"].brightness == pytest.approx((0.8, 1.2))
    assert steps["Normalize"].mean.tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert steps["Normalize"].std.tolist() == pytest.approx([0.4, 0.5, 0.6])
    pre = cli.datamodule.preprocessing  # the eval side, exported with the model
    assert (pre.mean, pre.std, pre.interpolation) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "nearest")


def test_each_stage_sets_up_its_own_data_once(demo_data: Path, tmp_path: Path) -> None:
    """`vit-train test` and `predict` read only their folders (no training set scanned; predict takes
    the test folder when no predict folder is given), and a second set-up of a stage keeps the
    datasets of the first (their skip counts, a decoded in-memory copy)."""
    test_dir = tmp_path / "test"
    shutil.copytree(demo_data / "val", test_dir)
    for extra in sorted(test_dir.iterdir()):  # 30 images, where val has 24
        shutil.copy(next(extra.iterdir()), extra / "extra.jpg")
    dm = ImageFolderDataModule(str(demo_data / "train"), str(demo_data / "val"), test_dir=str(test_dir),
                               image_size=16, crop_pct=1.0, num_workers=0)
    dm.setup("test")
    dm.setup("predict")
    assert sorted(dm.datasets) == ["predict", "test"]
    assert len(dm.datasets["test"]) == len(dm.datasets["predict"]) == 30
    test, predict = dm.datasets["test"], dm.datasets["predict"]
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    for stage in ("fit", "validate", "test", "predict"):
        dm.setup(stage)
    assert all(dm.datasets[k] is v for k, v in zip(("train", "val", "test", "predict"), (train, val, test, predict)))
    alone = ImageFolderDataModule(str(demo_data / "train"), str(demo_data / "val"), image_size=16, crop_pct=1.0,
                                  num_workers=0)
    alone.setup("validate")  # `vit-train validate`: the validation set
    assert len(alone.datasets["val"]) == 24
    with pytest.raises(DatasetError, match=r"^`vit-train predict` needs --data.predict_dir \(a folder of images\)$"):
        ImageFolderDataModule(str(demo_data / "train")).setup("predict")  # no predict, test or val folder


def test_the_held_out_split_is_fixed_by_the_seed_and_never_empty(demo_data: Path, tmp_path: Path) -> None:
    """The same --data.seed holds out the same images in every run (a later `vit-train validate` or a
    resume evaluates on what training never saw); at least one image, and never all of them."""
    def held_out(root: Path, fraction: float, seed: int = 42) -> list[int]:
        dm = ImageFolderDataModule(str(root), None, val_fraction=fraction, seed=seed, image_size=16, crop_pct=1.0,
                                   num_workers=0)
        dm.setup("fit")
        return sorted(dm.datasets["val"].indices)

    train = demo_data / "train"  # 72 images
    assert held_out(train, 0.25) == held_out(train, 0.25) != held_out(train, 0.25, seed=1)
    assert len(held_out(train, 0.01)) == 1  # int(0.72) would be none
    for cls in ("a", "b"):  # one image a class: holding out both leaves nothing to train on
        (tmp_path / "two" / cls).mkdir(parents=True)
        Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / "two" / cls / "x.jpg")
    with pytest.raises(DatasetError, match=f"^{tmp_path / 'two'}: too few images to hold out a validation split$"):
        held_out(tmp_path / "two", 1.0)


def test_a_corrupt_file_in_a_held_out_split_is_counted(demo_data: Path, tmp_path: Path) -> None:
    """Both halves of a --data.val_fraction split are Subsets: their skips count all the same."""
    data = tmp_path / "train"
    shutil.copytree(demo_data / "train", data)
    bad = sorted(data.iterdir())[1] / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dm = ImageFolderDataModule(str(data), None, val_fraction=0.25, image_size=16, crop_pct=1.0, num_workers=0,
                               color_jitter=None, auto_augment=None, re_prob=0.0)
    dm.setup("fit")
    assert dm.num_skipped_files() == 0
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        for split in ("train", "val"):
            for i in range(len(dm.datasets[split])):
                dm.datasets[split][i]
    assert dm.num_skipped_files() == 1


def test_corrupt_file_is_skipped_and_counted(demo_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    bad = sorted((data / "val").iterdir())[2] / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = demo_config(tmp_path, data, max_epochs=1, limit_train_batches=1)
    result = run_cli_in_process("vit-train", "fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert _column(_metrics(tmp_path), "data/skipped_files") == [1.0]
    warnings = [line for line in result.stderr.splitlines() if "skipping unreadable image" in line]
    assert len(warnings) == 1 and str(bad) in warnings[0]


def test_export_dir_writes_a_loadable_artifact(trained_run: Path, tmp_path: Path) -> None:
    (ckpt,) = (trained_run / "checkpoints").glob("best-*.ckpt")
    out = tmp_path / "exported"
    result = run_cli_in_process("vit-export", "--ckpt", str(ckpt), "--name", "dir-test", "--dir", str(out),
                     env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "vit_artifact.json"]
    model, artifact = load_model(out)
    module = ViTClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), module(x), rtol=0, atol=0)
    assert artifact.class_names == module.hparams.class_names
    assert artifact.metadata["val_acc1"] == pytest.approx(_recorded(ckpt)["val_acc1"])
    # The same weights as the copy in the BentoML store.
    name, version = result.stdout.strip().splitlines()[-1].split(":")
    stored = tmp_path / "bentoml/models" / name / version / "model.safetensors"
    assert stored.read_bytes() == (out / "model.safetensors").read_bytes()
