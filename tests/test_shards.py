"""LitData streaming shards: `vit-data optimize`, the DataModule on shards (same transforms and
class checks as folders), 2-process DDP (gloo) coverage, and mid-epoch resume without repeats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from tests.conftest import run_cli, run_cli_in_process
from training.data import ImageFolderDataModule
from training.folder_dataset import DatasetError, ImageFolderDataset
from training.module import ViTClassifier
from training.shards import ShardDataset, optimize_folder
from vit_service.preprocessing import decode_image
from bench.local_server import free_port

BATCH = 4
DATA_ARGS = dict(image_size=64, crop_pct=1.0, batch_size=BATCH, num_workers=0, color_jitter=None,
                 auto_augment=None, re_prob=0.0)


@pytest.fixture(scope="module")
def shards(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo data's train (72 images) and val (24) splits as shards, unchanged bytes."""
    out = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        written, skipped = optimize_folder(str(demo_data / split), str(out / split), workers=1)
        assert skipped == [] and written == len(list((demo_data / split).glob("*/*.jpg")))
    return out


def test_optimize_cli_drops_corrupt_files_lists_them_and_downscales(demo_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(demo_data / "val", src)
    bad = src / "circle" / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "shards"
    result = run_cli("vit-data", "optimize", str(src), str(out), "--workers", "2", "--max-side", "32")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropped 1 unreadable file" in result.stdout and str(bad) in result.stdout
    assert (out / "skipped.tsv").read_text().startswith(f"{bad}\t")
    classes = json.loads((out / "classes.json").read_text())["class_names"]
    assert classes == sorted(p.name for p in src.iterdir())

    expected = {s[0]: s[1] for s in ImageFolderDataset(src, class_names=classes).samples if s[0] != str(bad)}
    dataset = ShardDataset(str(out), transform=None, shuffle=False)
    assert len(dataset) == len(expected)
    seen = {}
    for i in range(len(dataset)):
        item = super(ShardDataset, dataset).__getitem__(i)  # the raw stored sample
        img, label = dataset[i]
        assert max(img.size) <= 32
        seen[str(src / item["path"])] = label
    assert seen == expected  # every readable file once, with its folder's label


def test_optimize_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli_in_process("vit-data", "optimize", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert result.returncode == 2 and str(tmp_path / "nope") in result.stderr and "Traceback" not in result.stderr


def test_shards_get_the_same_eval_transform_and_classes_as_folders(shards: Path, demo_data: Path) -> None:
    from_shards = ImageFolderDataModule(str(shards / "train"), str(shards / "val"), **DATA_ARGS)
    from_folders = ImageFolderDataModule(str(demo_data / "train"), str(demo_data / "val"), **DATA_ARGS)
    assert from_shards.class_names == from_folders.class_names
    from_shards.setup("fit")
    from_folders.setup("fit")
    val_shards, val_folder = from_shards.datasets["val"], from_folders.datasets["val"]
    val_shards.return_ids = True
    for i in (0, 7, len(val_folder) - 1):
        x, label, sample_id = val_shards[i]
        x_ref, label_ref = val_folder[sample_id]
        assert label == label_ref
        torch.testing.assert_close(x, x_ref, rtol=0, atol=0)


def test_shard_training_batches_are_full_and_no_file_counts_as_skipped(shards: Path) -> None:
    """Mixup needs full batches: training drops the last partial one, validation keeps every image.
    Shards hold no unreadable files (dropped when written), so none are counted."""
    dm = ImageFolderDataModule(str(shards / "train"), str(shards / "val"), **{**DATA_ARGS, "batch_size": 5})
    dm.setup("fit")
    assert [len(labels) for _, labels in dm.train_dataloader()] == [5] * 14  # 72 images
    assert [len(labels) for _, labels in dm.val_dataloader()] == [5, 5, 5, 5, 4]  # 24 images
    assert dm.num_skipped_files() == 0


def test_each_kind_of_training_data_gets_its_loader_settings(shards: Path, demo_data: Path) -> None:
    """Folders, shards and images decoded in memory: the worker processes asked for (none for the
    images in memory, where workers would only copy), folder workers kept between epochs, no pinned
    memory without CUDA; in memory, training batches shuffled and full, validation every image in
    order."""
    args = {**DATA_ARGS, "batch_size": 5, "num_workers": 1}
    folders = ImageFolderDataModule(str(demo_data / "train"), str(demo_data / "val"), **args)
    from_shards = ImageFolderDataModule(str(shards / "train"), str(shards / "val"), **args)
    in_memory = ImageFolderDataModule(str(demo_data / "train"), str(demo_data / "val"), **args, in_memory=True)
    assert not torch.cuda.is_available()  # what the pin_memory checks rely on
    for dm, workers in ((folders, (1, 1)), (from_shards, (1, 1)), (in_memory, (0, 1))):  # (train, val)
        dm.setup("fit")
        loaders = (dm.train_dataloader(), dm.val_dataloader())
        assert tuple(loader.num_workers for loader in loaders) == workers
        assert not any(loader.pin_memory for loader in loaders)
    assert folders.train_dataloader().persistent_workers and folders.val_dataloader().persistent_workers

    labels = [y.tolist() for _, y in in_memory.train_dataloader()]  # 72 images: 14 full batches
    assert [len(batch) for batch in labels] == [5] * 14
    flat = [label for batch in labels for label in batch]
    assert flat != sorted(flat)  # shuffled: the dataset itself lists the images class by class
    val_labels = [y.tolist() for _, y in in_memory.val_dataloader()]
    assert [len(batch) for batch in val_labels] == [5, 5, 5, 5, 4]
    assert sum(val_labels, []) == [label for _, label in in_memory.datasets["val"].samples]


def test_class_mismatch_between_shards_and_val_folder_is_a_clear_error(shards: Path, demo_data: Path,
                                                                      tmp_path: Path) -> None:
    val = tmp_path / "val"
    shutil.copytree(demo_data / "val", val)
    victim = sorted(val.iterdir())[0]
    shutil.rmtree(victim)
    dm = ImageFolderDataModule(str(shards / "train"), str(val), **DATA_ARGS)
    with pytest.raises(DatasetError, match=victim.name):
        dm.setup("fit")


def test_shard_training_order_follows_the_seed_and_validation_stays_in_file_order(shards: Path) -> None:
    def epoch(split: str, seed: int) -> list[int]:
        dm = ImageFolderDataModule(str(shards / "train"), str(shards / "val"), **{**DATA_ARGS, "seed": seed})
        dm.setup("fit")
        dm.datasets[split].return_ids = True
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        return [i for _, _, ids in loader for i in ids.tolist()]

    first = epoch("train", seed=1)
    assert sorted(first) == list(range(72)) and first != sorted(first)  # every image once, shuffled
    assert epoch("train", seed=1) == first and epoch("train", seed=2) != first  # --data.seed decides the order
    assert epoch("val", seed=1) == list(range(24))


def test_val_shards_with_other_classes_are_named_in_the_error(shards: Path, demo_data: Path, tmp_path: Path) -> None:
    train = tmp_path / "train"
    shutil.copytree(demo_data / "train", train)
    shutil.rmtree(sorted(train.iterdir())[0])
    dm = ImageFolderDataModule(str(train), str(shards / "val"), **DATA_ARGS)
    with pytest.raises(DatasetError, match=f"^{shards / 'val'}: classes differ"):
        dm.setup("fit")


def test_a_large_jpeg_in_val_shards_gives_the_service_s_tensor(tmp_path: Path) -> None:
    """As from a folder (test_preprocessing.py): held-out shards are decoded with the service's JPEG
    draft size, so an 800 x 600 photo reaches the model as the same upload would."""
    from tests.test_preprocessing import _photo

    for split in ("train", "val"):
        for seed, cls in enumerate(("a", "b")):
            (tmp_path / "src" / split / cls).mkdir(parents=True)
            _photo(800, 600, seed=seed).save(tmp_path / "src" / split / cls / "x.jpg", quality=92)
        optimize_folder(str(tmp_path / "src" / split), str(tmp_path / "shards" / split), workers=1)
    dm = ImageFolderDataModule(str(tmp_path / "shards/train"), str(tmp_path / "shards/val"), image_size=64,
                               crop_pct=1.0, num_workers=0)
    dm.setup("fit")
    pre, val = dm.preprocessing, dm.datasets["val"]
    assert len(val) == 2
    for i in range(len(val)):
        x, label = val[i]
        data = (tmp_path / "src/val" / dm.class_names[label] / "x.jpg").read_bytes()
        served = pre.normalize(pre.to_uint8(decode_image(data, draft_size=pre.resize_size)))
        torch.testing.assert_close(x, served, rtol=0, atol=0)


def _rank_ids(rank: int, world_size: int, port: int, shard_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        dm = ImageFolderDataModule(f"{shard_dir}/train", f"{shard_dir}/val", **DATA_ARGS)
        dm.setup("fit")
        dm.datasets["train"].return_ids = True
        ids = [i for _, _, batch_ids in dm.train_dataloader() for i in batch_ids.tolist()]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(ids))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_see_disjoint_parts_that_cover_the_epoch(shards: Path, tmp_path: Path) -> None:
    # 72 images, 2 ranks, batch 4: 9 full batches each, so nothing is dropped to even them out.
    mp.spawn(_rank_ids, args=(2, free_port(), str(shards), str(tmp_path)), nprocs=2, join=True)
    ids = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ids[0]) == len(ids[1]) == 36
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == list(range(72))


class _RecordIds(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 6)
        self.seen: list[int] = []

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y, ids = batch
        self.seen += ids.tolist()
        return F.cross_entropy(self.head(x.mean(dim=(2, 3))), y)  # (B, 3) pooled pixels -> 6 logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Killed(RuntimeError):
    pass


class _KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise _Killed(f"killed at step {self.step}")


class _ShardsWithIds(ImageFolderDataModule):
    """The DataModule as vit-train builds it (Lightning calls setup), its train samples carrying ids."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.datasets["train"].return_ids = True


class _ViTRecordIds(ViTClassifier):
    """The real module (its optimizer and schedule ask Lightning for the run's step count, as
    `vit-train fit` does), recording which samples each training step saw."""

    def __init__(self, class_names: list[str]) -> None:
        super().__init__(preset="vit_demo_patch8_64", num_classes=len(class_names), class_names=class_names)
        self.seen: list[int] = []

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y, ids = batch
        self.seen += ids.tolist()
        return super().training_step((x, y), batch_idx)


def _fit(shards: Path, root: Path, callbacks: list[Callback], ckpt_path: str | None = None,
         module: Callable[[list[str]], L.LightningModule] = lambda class_names: _RecordIds()) -> Any:
    """One epoch of `module(class_names)` on the shards by trainer.fit(datamodule=...), as vit-train
    runs it (stopped by a _KillAtStep callback, or resumed from ckpt_path); returns the module."""
    dm = _ShardsWithIds(str(shards / "train"), str(shards / "val"), **{**DATA_ARGS, "num_workers": 2})
    model = module(dm.class_names)
    trainer = L.Trainer(default_root_dir=root, max_epochs=1, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    except _Killed:
        pass
    return model


# "vit": the real ViTClassifier, whose configure_optimizers asks for the step count before the
# checkpoint's loader state is restored; Lightning then dropped that state (Lightning #20550) and
# the resumed run replayed the epoch from its start (training/lightning_compat.py).
@pytest.mark.parametrize("module", [lambda class_names: _RecordIds(), _ViTRecordIds], ids=["plain", "vit"])
def test_run_killed_mid_epoch_resumes_without_repeating_or_dropping_samples(shards: Path, tmp_path: Path,
                                                                            module: Callable) -> None:
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    first = _fit(shards, tmp_path, [every, _KillAtStep(9)], module=module)  # 18 steps an epoch; dies at step 9
    assert len(first.seen) == 9 * BATCH
    resumed = _fit(shards, tmp_path, [], ckpt_path=str(tmp_path / "step=6.ckpt"), module=module)
    done_before_checkpoint = first.seen[: 6 * BATCH]
    assert len(resumed.seen) == 12 * BATCH  # the rest of the epoch, not a whole new one
    assert sorted(done_before_checkpoint + resumed.seen) == list(range(72))  # no repeats, no gaps


def test_vit_train_fits_on_shards(shards: Path, demo_data: Path, tmp_path: Path) -> None:
    from tests.conftest import demo_config

    config = demo_config(tmp_path, demo_data)
    result = run_cli_in_process("vit-train", "fit", "--config", str(config), "--data.train_dir", str(shards / "train"),
                                "--data.val_dir", str(shards / "val"), "--trainer.max_epochs", "1",
                                "--trainer.limit_train_batches", "3", "--data.batch_size", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    last = torch.load(tmp_path / "version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 3
    assert last["hyper_parameters"]["class_names"] == sorted(p.name for p in (demo_data / "train").iterdir())


def test_shards_need_a_val_dir_and_in_memory_refuses_them(shards: Path, demo_data: Path, tmp_path: Path) -> None:
    from tests.conftest import demo_config

    config = demo_config(tmp_path, demo_data, max_epochs=1, limit_train_batches=1)
    no_val = run_cli_in_process("vit-train", "fit", "--config", str(config), "--data.train_dir", str(shards / "train"),
                                "--data.val_dir", "null")
    assert no_val.returncode == 2, no_val.stderr[-3000:]
    assert (f"vit-train: error: {shards / 'train'}: shards need --data.val_dir (holding out --data.val_fraction "
            "works on folders only)") in no_val.stderr
    assert "Traceback" not in no_val.stderr
    in_memory = run_cli_in_process("vit-train", "fit", "--config", str(config), "--data.train_dir",
                                   str(shards / "train"), "--data.val_dir", str(shards / "val"), "--data.in_memory", "true")
    assert in_memory.returncode == 2, in_memory.stderr[-3000:]
    assert f"{shards / 'train'}: --data.in_memory reads image folders, not shards" in in_memory.stderr
    assert "Traceback" not in in_memory.stderr
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before any training


@pytest.mark.slow  # ~25-45 s of three CLI runs; test_run_killed_mid_epoch_resumes_...[vit] above guards the fix in-process
def test_vit_train_fit_ckpt_path_last_resumes_mid_epoch_without_repeats(demo_data: Path, tmp_path: Path) -> None:
    # Through the real CLI: a run killed at step 6 of an epoch's 9 (last.ckpt written at step 4),
    # then `vit-train fit --ckpt_path last`. With the random crop and flip turned off, each image
    # reaches the model unchanged, so its pixel sum names it: the first 4 steps and the resumed
    # run together must see every training image exactly once (no repeats, no gaps), and the
    # resumed run only the rest of the epoch (5 steps). This test found Lightning #20550 (the resumed
    # run replayed the epoch from its start); training/lightning_compat.py works around it.
    from PIL import Image

    from tests.conftest import REPO, demo_config

    # Square 64 px copies: a scale-1, ratio-1 random crop of a near-square image still moves by a
    # pixel at random, which would change its pixel sum between processes.
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        for src in (demo_data / split).glob("*/*.jpg"):
            dest = tmp_path / "square" / split / src.parent.name / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as img:
                img.convert("RGB").resize((64, 64), Image.BICUBIC).save(dest, quality=95)
        optimize_folder(str(tmp_path / "square" / split), str(shards / split), workers=1)

    def fit(root: Path, *args: str, kill_at: int | None = None) -> list[list[float]]:
        probe = [{"class_path": "tests.training_probe.TrainingProbe", "init_args": {"out_dir": str(root)}}]
        if kill_at:
            probe.append({"class_path": "tests.training_probe.KillAtStep", "init_args": {"step": kill_at}})
        root.mkdir(exist_ok=True)
        config = demo_config(root, demo_data, callbacks=probe, max_epochs=1, limit_val_batches=1,
                             num_sanity_val_steps=0)
        r = run_cli("vit-train", "fit", "--config", str(config), "--data.train_dir", str(shards / "train"),
                    "--data.val_dir", str(shards / "val"), "--data.batch_size", "8", "--data.num_workers", "1",
                    "--data.scale", "[1.0, 1.0]", "--data.ratio", "[1.0, 1.0]", "--data.hflip", "0",
                    *args, env={"PYTHONPATH": str(REPO)})
        assert (r.returncode != 0) if kill_at else (r.returncode == 0), r.stderr[-3000:]
        return json.loads((root / "rank0.json").read_text())["batch_sums"]

    whole = [s for batch in fit(tmp_path / "whole") for s in batch]
    assert len(whole) == 72 and len(set(whole)) == 72  # one epoch; every image told apart by its sum
    root = tmp_path / "stopped"
    first = fit(root, "--last_checkpoint.every_n_train_steps", "4", kill_at=6)
    assert len(first) == 6
    assert torch.load(root / "version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    resumed = fit(root, "--ckpt_path", "last")
    assert len(resumed) == 5  # the rest of the epoch after the checkpoint, not a whole new one
    seen = [s for batch in first[:4] + resumed for s in batch]
    assert sorted(seen) == sorted(whole)  # each image once: no repeats, no gaps
    assert sorted(p.name for p in root.glob("version_*")) == ["version_0"]
    assert torch.load(root / "version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 9
