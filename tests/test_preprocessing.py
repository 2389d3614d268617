"""The shared eval preprocessing: timm's eval transform is the oracle; training and serving agree."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from training.data import ImageFolderDataModule
from vit_service.preprocessing import InvalidImageError, Preprocessing, decode_image


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size, crop_pct, interpolation, wh", [
    (224, 0.875, "bicubic", (500, 375)),
    (224, 0.9, "bilinear", (300, 640)),
    (64, 1.0, "bicubic", (97, 150)),
    (32, 1.0, "bicubic", (32, 32)),
])
def test_matches_timm_eval_transform(size: int, crop_pct: float, interpolation: str, wh: tuple[int, int]) -> None:
    pre = Preprocessing(size, crop_pct, interpolation)
    timm_tf = create_transform(input_size=size, is_training=False, crop_pct=crop_pct,
                               interpolation=interpolation, mean=pre.mean, std=pre.std)
    img = _photo(*wh)
    ours = pre(img)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, timm_tf(img), rtol=0, atol=1e-5)


def test_uint8_then_normalize_equals_call() -> None:
    pre = Preprocessing(64, 1.0)
    img = _photo(120, 80)
    u8 = pre.to_uint8(img)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 64, 64)
    torch.testing.assert_close(pre.normalize(u8[None])[0], pre(img))


def test_round_trips_through_dict() -> None:
    pre = Preprocessing(96, 0.95, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert Preprocessing.from_dict(pre.to_dict()) == pre


@pytest.mark.parametrize("kwargs", [{"crop_pct": 0.0}, {"crop_pct": 1.5}, {"interpolation": "cubic"}])
def test_bad_settings_are_errors(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Preprocessing(224, **kwargs)


def test_validation_decodes_exactly_as_serving(tmp_path: Path) -> None:
    """A large JPEG in a val folder gives the service's tensor bit for bit (same draft decode)."""
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            _photo(800, 600, seed=len(cls)).save(folder / "x.jpg", quality=92)
    dm = ImageFolderDataModule(str(tmp_path / "train"), str(tmp_path / "val"), image_size=64,
                               crop_pct=1.0, num_workers=0)
    dm.setup("fit")
    x_val, label = dm.datasets["val"][0]
    data = (tmp_path / "val" / "a" / "x.jpg").read_bytes()
    pre = dm.preprocessing
    served = pre.normalize(pre.to_uint8(decode_image(data, draft_size=pre.resize_size)))
    torch.testing.assert_close(x_val, served, rtol=0, atol=0)
    assert label == 0


def test_draft_decoding_keeps_enough_resolution() -> None:
    buf = io.BytesIO()
    _photo(1600, 1200).save(buf, "JPEG")
    img = decode_image(buf.getvalue(), draft_size=100)
    assert min(img.size) >= 100 and img.size[0] < 1600  # reduced, never below the resize size


def test_decompression_bomb_is_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buf, "PNG")  # 36 MP, compresses to a few KB
    with pytest.raises(InvalidImageError, match="above the limit"):
        decode_image(buf.getvalue(), max_pixels=10_000_000)
