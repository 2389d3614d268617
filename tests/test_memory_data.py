"""`--data.in_memory`: training images decoded once into memory and augmented a batch at a time.

The batch augmentation is checked against hand-computed results (an identity crop returns the
normalised image pixel for pixel; a half-size output of the whole image is 2x2 average pooling;
a flip is a flip), the decoded store against the eval decode of each file, and the option end to
end in a real `vit-train fit` whose model inputs are recorded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import demo_config
from tests.training_probe import TrainingProbe
from training import memory_data
from training.cli import run_cli
from training.folder_dataset import DatasetError, SkippedImageWarning, scan_image_folder
from training.memory_data import BatchAugment, DecodedImages
from vit_service.preprocessing import Preprocessing, open_image

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _images(b: int = 4, side: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std


def test_identity_crop_returns_the_normalised_image() -> None:
    # scale (1, 1) and ratio (1, 1): the box is the whole image; aligned sampling hits pixel centres.
    x = _images()
    out = BatchAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, mean=MEAN, std=STD)(x)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, _normalised(x), atol=1e-4, rtol=0)


def test_whole_image_at_half_size_is_2x2_average_pooling() -> None:
    x = _images()
    out = BatchAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, mean=MEAN, std=STD)(x)
    torch.testing.assert_close(out, _normalised(F.avg_pool2d(x.float(), 2)), atol=1e-4, rtol=0)


def test_flip_probability_one_mirrors_every_image() -> None:
    x = _images()
    out = BatchAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0, mean=MEAN, std=STD)(x)
    torch.testing.assert_close(out, _normalised(x.flip(-1)), atol=1e-4, rtol=0)


def test_crop_boxes_follow_scale_and_ratio_and_stay_inside() -> None:
    torch.manual_seed(0)
    aug = BatchAugment(32, scale=(0.25, 0.5), ratio=(0.75, 4 / 3), hflip=0.0, mean=MEAN, std=STD)
    boxes = aug.crop_boxes(4000, 40, 30, torch.device("cpu"))  # H 40, W 30
    index, x1, y1, x2, y2 = boxes.unbind(1)
    assert torch.equal(index, torch.arange(4000, dtype=boxes.dtype))
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 30 + 1e-4).all() and (y2 <= 40 + 1e-4).all()
    w, h = x2 - x1, y2 - y1
    share = w * h / (40 * 30)
    assert share.min() >= 0.25 - 1e-4 and share.max() <= 0.5 + 1e-4
    aspect = w / h
    assert aspect.min() >= 0.75 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4
    # Log-uniform aspect: as many boxes wider than square as taller (within sampling noise).
    assert abs(float((aspect > 1).float().mean()) - 0.5) < 0.05
    # Positions spread over the free room, not pinned to a corner.
    where = x1 / (30 - w).clamp(min=1e-6)  # 0: left edge, 1: right edge of the free room
    assert float(where.min()) < 0.05 and float(where.max()) > 0.95


def test_random_erasing_runs_on_the_batch() -> None:
    torch.manual_seed(0)
    x = _images(b=16)
    plain = BatchAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, mean=MEAN, std=STD)(x)
    erased = BatchAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, mean=MEAN, std=STD, re_prob=1.0)(x)
    changed = (erased != plain).flatten(1).any(1)
    assert changed.all()  # every image got a rectangle of noise
    assert ((erased != plain).flatten(1).float().mean(1) < 0.5).all()  # a rectangle, not the whole image


def test_decoded_images_match_the_eval_decode_and_drop_bad_files(demo_data: Path, tmp_path: Path) -> None:
    samples = scan_image_folder(demo_data / "train")[:10]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.warns(SkippedImageWarning, match="bad.jpg"):
        ds = DecodedImages([*samples[:5], (str(bad), 3), *samples[5:]], size=32, root="demo")
    assert len(ds) == 10 and ds.num_skipped == 1 and ds.skipped_files == [str(bad)]
    resize = Preprocessing(32, crop_pct=1.0, interpolation="bicubic")
    for i, (path, label) in enumerate(samples):
        image, got_label = ds[i]
        assert got_label == label
        assert torch.equal(image, resize.to_uint8(open_image(path)))


def _fake_meminfo(available_kib: int):
    """An `open` for memory_data that serves a /proc/meminfo whose MemAvailable is given (kB, as
    the kernel writes it) and whose MemTotal / MemFree would give other answers."""
    import builtins
    import io

    text = (f"MemTotal:       {available_kib * 8} kB\nMemFree:        {available_kib // 4} kB\n"
            f"MemAvailable:   {available_kib} kB\nBuffers:          1024 kB\n")

    def fake_open(path, *args, **kwargs):
        return io.StringIO(text) if str(path) == "/proc/meminfo" else builtins.open(path, *args, **kwargs)

    return fake_open


def test_decoded_images_refuse_more_than_half_the_available_ram(demo_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 72 images x 3 x 32 x 32 bytes = 221,184 bytes = 216 KiB: accepted with 432 KiB available
    # (exactly half), refused with 431 KiB, read from MemAvailable (not MemTotal or MemFree).
    samples = scan_image_folder(demo_data / "train")
    needed_kib = len(samples) * 3 * 32 * 32 // 1024
    assert needed_kib == 216
    monkeypatch.setattr(memory_data, "open", _fake_meminfo(2 * needed_kib), raising=False)
    assert memory_data._available_memory() == 2 * needed_kib * 1024
    assert len(DecodedImages(samples, size=32, root="train")) == 72
    monkeypatch.setattr(memory_data, "open", _fake_meminfo(2 * needed_kib - 1), raising=False)
    with pytest.raises(DatasetError, match=r"train: 72 images at 32 px need 0.0 GiB in memory, more than 50% of "
                                           r"the 0.0 GiB available.*--data.in_memory false"):
        DecodedImages(samples, size=32, root="train")


def test_decoded_images_refuse_a_store_over_half_this_machines_ram(demo_data: Path) -> None:
    # The real /proc/meminfo: a store sized (on paper) at 0.6 x MemAvailable is refused before
    # anything is decoded (a list of one repeated file; nothing near that size is allocated).
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    sample = scan_image_folder(demo_data / "train")[0]
    too_many = int(0.6 * available / (3 * 32 * 32))
    with pytest.raises(DatasetError, match=rf"big: {too_many} images at 32 px need .* more than 50% of the"):
        DecodedImages([sample] * too_many, size=32, root="big")


def _in_memory_fit(demo_data: Path, tmp_path: Path, *extra: str):
    config = demo_config(tmp_path, demo_data, callbacks=[{"class_path": "tests.training_probe.TrainingProbe"}],
                         num_sanity_val_steps=0, limit_val_batches=1, max_epochs=1, limit_train_batches=2)
    cli = run_cli(["fit", "--config", str(config), "--data.batch_size", "8", "--data.in_memory", "true",
                   "--data.color_jitter", "null", "--data.auto_augment", "null", "--data.re_prob", "0",
                   "--model.mixup_alpha", "0", "--model.cutmix_alpha", "0", *extra])
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, TrainingProbe))
    return cli, probe


def _nearest_stored(seen: torch.Tensor, dm) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image the model saw: its distance (max abs) to the nearest stored image,
    normalised by hand, as it is and mirrored."""
    mean = torch.tensor(dm.hparams.mean).view(1, 3, 1, 1)
    std = torch.tensor(dm.hparams.std).view(1, 3, 1, 1)
    stored = (dm.datasets["train"].images.float() / 255 - mean) / std  # (72, 3, S, S)
    def dist(ref: torch.Tensor) -> torch.Tensor:
        return (seen[:, None] - ref[None]).abs().flatten(2).amax(-1).amin(-1)  # (B,)
    return dist(stored), dist(stored.flip(-1))


def test_fit_in_memory_trains_on_batch_augmented_images(demo_data: Path, tmp_path: Path) -> None:
    cli, probe = _in_memory_fit(demo_data, tmp_path)
    dm = cli.datamodule
    assert isinstance(dm.datasets["train"], DecodedImages) and len(dm.datasets["train"]) == 72
    assert dm.train_dataloader().num_workers == 0
    seen = probe.model_inputs[0]  # what the model saw: float, normalised, at image_size
    size = dm.hparams.image_size
    assert seen.shape == (8, 3, size, size) and seen.dtype == torch.float32
    # Normalised with the data's mean/std: pixel values map into [(0 - mean) / std, (1 - mean) / std].
    lo = min((0 - m) / s for m, s in zip(dm.hparams.mean, dm.hparams.std))
    hi = max((1 - m) / s for m, s in zip(dm.hparams.mean, dm.hparams.std))
    assert lo - 1e-4 <= float(seen.min()) and float(seen.max()) <= hi + 1e-4
    assert float(seen.std()) > 0.1
    assert cli.trainer.global_step == 2
    # Cropped (configs/demo.yaml: scale 0.6-1): no image the model saw is a stored image as it is
    # or mirrored; every one is far from all 72 of them.
    plain, mirrored = _nearest_stored(seen, dm)
    assert (plain > 0.1).all() and (mirrored > 0.1).all(), (plain, mirrored)


def test_fit_in_memory_flips_half_the_images(demo_data: Path, tmp_path: Path) -> None:
    # With the crop made the identity (scale 1, ratio 1), every image the model saw is a stored
    # image, pixel for pixel, as it is or mirrored, and both occur (flip probability 0.5).
    cli, probe = _in_memory_fit(demo_data, tmp_path, "--data.scale", "[1.0, 1.0]", "--data.ratio", "[1.0, 1.0]",
                                "--data.hflip", "0.5")
    plain, mirrored = _nearest_stored(probe.model_inputs[0], cli.datamodule)
    as_is, flipped = plain < 1e-4, mirrored < 1e-4
    assert (as_is | flipped).all(), (plain, mirrored)
    assert (as_is & ~flipped).any() and (flipped & ~as_is).any(), (plain, mirrored)


def test_in_memory_decodes_only_the_training_part_of_a_split_with_the_data_options(demo_data: Path) -> None:
    """--data.in_memory with a held-out split (no val_dir): only the training part is decoded (none of
    the held-out images), at the asked interpolation, and the batch augmentation erases as asked."""
    from training.data import ImageFolderDataModule

    dm = ImageFolderDataModule(str(demo_data / "train"), None, val_fraction=0.25, image_size=32, crop_pct=1.0,
                               interpolation="bilinear", num_workers=0, color_jitter=None, auto_augment=None,
                               scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, re_prob=1.0, in_memory=True)
    dm.setup("fit")
    train, val = dm.datasets["train"], dm.datasets["val"]
    resize = Preprocessing(32, crop_pct=1.0, interpolation="bilinear")

    def key(image: torch.Tensor) -> bytes:
        return image.numpy().tobytes()

    decoded = {path: key(resize.to_uint8(open_image(path))) for path, _ in val.dataset.samples}
    held_out = {decoded[val.dataset.samples[i][0]] for i in val.indices}
    assert (len(train), len(val)) == (54, 18)  # 72 images
    assert {key(image) for image in train.images} == set(decoded.values()) - held_out

    images = train.images[:8]  # (8, 3, 32, 32) uint8
    mean = torch.tensor(dm.hparams.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(dm.hparams.std).view(1, 3, 1, 1) * 255
    plain = (images.float() - mean) / std  # what the identity crop gives without erasing
    erased = dm.batch_augment(images)
    assert ((erased - plain).abs().flatten(1).amax(1) > 0.1).all()  # --data.re_prob 1: every image


def test_in_memory_with_no_readable_training_image_names_the_folder(demo_data: Path, tmp_path: Path) -> None:
    from training.data import ImageFolderDataModule

    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        (tmp_path / "train" / cls / "x.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    dm = ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "train"), image_size=32, num_workers=0,
                               color_jitter=None, auto_augment=None, in_memory=True)
    with pytest.warns(SkippedImageWarning), \
            pytest.raises(DatasetError, match=f"^{tmp_path / 'train'}: none of the 2 images could be decoded$"):
        dm.setup("fit")


def test_in_memory_refuses_per_image_augmentations(demo_data: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli_in_process

    config = demo_config(tmp_path, demo_data, max_epochs=1, limit_train_batches=1)
    result = run_cli_in_process("vit-train", "fit", "--config", str(config), "--data.in_memory", "true",
                                "--data.auto_augment", "rand-m9-mstd0.5-inc1")
    assert result.returncode == 2
    assert ("vit-train: error: --data.in_memory augments whole batches (crop, flip, erasing): set --data.color_jitter "
            "null and --data.auto_augment null, or in_memory false") in result.stderr
    assert "Traceback" not in result.stderr
