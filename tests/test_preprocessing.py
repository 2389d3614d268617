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


@pytest.mark.parametrize("kwargs", [{"crop_pct": 0.0}, {"crop_pct": 1.5}, {"interpolation": "cubic"},
                                    {"crop_mode": "stretch"}])
def test_bad_settings_are_errors_naming_the_setting(kwargs: dict) -> None:
    [(name, value)] = kwargs.items()
    with pytest.raises(ValueError, match=f"{name} must be .*, got '?{value}'?$"):
        Preprocessing(224, **kwargs)


def test_mean_and_std_from_lists_are_float_tuples() -> None:
    """A YAML config gives lists of ints or floats; the preprocessing stays one hashable value,
    equal to the artifact's."""
    pre = Preprocessing(8, 1.0, mean=[0, 1, 0.5], std=[1, 2, 4])
    assert pre.mean == (0.0, 1.0, 0.5) and pre.std == (1.0, 2.0, 4.0)
    assert all(type(v) is float for v in pre.mean + pre.std)
    assert pre == Preprocessing(8, 1.0, mean=(0.0, 1.0, 0.5), std=(1.0, 2.0, 4.0))
    assert hash(pre) == hash(Preprocessing.from_dict(pre.to_dict()))


@pytest.mark.parametrize("wh", [(400, 200), (200, 400), (50, 50)])
def test_squash_resizes_both_sides_ignoring_the_aspect_ratio(wh: tuple[int, int]) -> None:
    pre = Preprocessing(32, 0.8, crop_mode="squash")  # resize to 40 x 40, then the centre 32 x 32
    assert pre.geometry(*wh) == ((40, 40), (4, 4, 36, 36))
    img = _photo(*wh)
    expected = img.resize((40, 40), Image.Resampling.BICUBIC).crop((4, 4, 36, 36))
    np.testing.assert_array_equal(pre.to_uint8(img).permute(1, 2, 0).numpy(), np.asarray(expected))


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


RAMP_16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once
DARK_16 = np.arange(0, 1001, dtype=np.uint16).reshape(7, 143)  # a dark 16-bit image: no stretching


@pytest.mark.parametrize("fmt,mode,values", [("PNG", "I;16", RAMP_16), ("TIFF", "I;16B", RAMP_16),
                                             ("TIFF", "I", RAMP_16), ("PNG", "I;16", DARK_16)],
                         ids=["png", "tiff-big-endian", "tiff-32-bit", "png-dark"])
def test_16_bit_grayscale_is_scaled_to_8_bits(fmt: str, mode: str, values: np.ndarray) -> None:
    """Every 16-bit value v becomes round(v * 255 / 65535) = round(v / 257), in each mode Pillow
    opens 16-bit files as (big-endian TIFF: I;16B; a 32-bit TIFF holding 16-bit values: I); a
    dark image stays dark (scaled, not stretched to its own maximum)."""
    h, w = values.shape
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (w, h), values.astype(">u2").tobytes())
    else:
        img = Image.fromarray(values.astype(np.int32) if mode == "I" else values)
    data = _encoded(img, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    out = np.asarray(decode_image(data))
    assert out.shape == (h, w, 3) and (out == out[..., :1]).all()  # gray
    np.testing.assert_array_equal(out[..., 0], np.round(values / 257).astype(np.uint8))


def test_32_bit_grayscale_above_16_bits_is_scaled_by_its_peak() -> None:
    values = np.array([[0, 70000], [140000, 35000]], np.int32)
    out = np.asarray(decode_image(_encoded(Image.fromarray(values), "TIFF")))
    np.testing.assert_array_equal(out[..., 0], [[0, 128], [255, 64]])  # v / 140000 * 255, rounded
    just_above = np.arange(65537, dtype=np.int32)  # a peak of 65536: scaled by it, not by 65535
    out = np.asarray(decode_image(_encoded(Image.fromarray(just_above[None]), "TIFF")))
    np.testing.assert_array_equal(out[0, :, 0], np.round(just_above * 255 / 65536).astype(np.uint8))


@pytest.mark.parametrize("values,expected", [
    ([[0.0, 0.25], [0.5, 1.0]], [[0, 63], [127, 255]]),  # 0..1 as it is: v * 255, truncated
    ([[0.2, 0.4]], [[51, 102]]),  # within 0..1: not stretched
    ([[2.0, 3.0], [4.0, 6.0]], [[85, 127], [170, 255]]),  # above 1: from 0 to the maximum
    ([[-1.0, 0.0], [1.0, 3.0]], [[0, 63], [127, 255]]),  # below 0: from the minimum
])
def test_float_images_map_0_to_1_onto_0_to_255_stretched_when_wider(values, expected) -> None:
    data = _encoded(Image.fromarray(np.array(values, np.float32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    np.testing.assert_array_equal(np.asarray(decode_image(data))[..., 0], expected)


def _palette(mode: str) -> Image.Image:
    img = Image.new(mode, (4, 1), (1, 255) if mode == "PA" else 1)  # palette entry 1, opaque
    img.putpalette([10, 20, 30, 200, 30, 60])
    return img


@pytest.mark.parametrize("make,fmt,mode", [
    (lambda: Image.new("LA", (4, 1), (100, 255)), "PNG", "LA"),
    (lambda: _palette("PA"), "TIFF", "PA"),
    (lambda: _palette("P"), "PNG", "P"),  # a tRNS chunk: palette entry 0 transparent
    (lambda: _palette("P"), "GIF", "P"),  # a transparent colour index
], ids=["la-png", "pa-tiff", "p-png", "p-gif"])
def test_transparent_pixels_are_white_in_every_mode(make, fmt: str, mode: str) -> None:
    img = make()
    if mode in ("LA", "PA"):
        img.putpixel((0, 0), (img.getpixel((0, 0))[0], 0))  # the first pixel fully transparent
        data = _encoded(img, fmt)
    else:
        img.putpixel((0, 0), 0)
        buf = io.BytesIO()
        img.save(buf, fmt, transparency=0)
        data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).mode == mode
    out = np.asarray(decode_image(data))[0]
    opaque = (100, 100, 100) if mode == "LA" else (200, 30, 60)
    assert [tuple(p) for p in out] == [(255, 255, 255), opaque, opaque, opaque]


@pytest.mark.parametrize("mode,key,other", [("RGB", (10, 200, 30), (1, 2, 3)), ("L", 77, 5)])
def test_a_transparent_colour_key_in_a_grayscale_or_rgb_png_is_white(mode: str, key, other) -> None:
    """PNG's tRNS chunk in an L or RGB image: pixels of that one colour are transparent (the
    README's "transparency over white"), the rest as they are."""
    img = Image.new(mode, (2, 1), key)
    img.putpixel((1, 0), other)
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=key)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
    out = [tuple(p) for p in np.asarray(decode_image(buf.getvalue()))[0]]
    assert out == [(255, 255, 255), other if mode == "RGB" else (other,) * 3]


@pytest.mark.parametrize("wh", [(1, 1), (1, 5), (5, 1)])
def test_one_pixel_wide_or_high_images_decode(wh: tuple[int, int]) -> None:
    assert decode_image(_encoded(Image.new("RGB", wh, (9, 8, 7)), "PNG")).size == wh


def test_the_pixel_limit_is_inclusive_and_the_refusal_says_the_size() -> None:
    data = _encoded(Image.new("L", (100, 50)), "PNG")
    assert decode_image(data, max_pixels=5000).size == (100, 50)
    with pytest.raises(InvalidImageError, match="^image is 100x50 = 5000 pixels, above the limit of 4999$"):
        decode_image(data, max_pixels=4999)


def test_headers_pillow_refuses_are_named() -> None:
    from service_fixtures import png_header_only

    with pytest.raises(InvalidImageError, match="^image dimensions exceed the limit of 1000 pixels$"):
        decode_image(png_header_only(20000, 10000), max_pixels=1000)  # Pillow's own bomb check, at open
    with pytest.raises(InvalidImageError, match="^cannot read image: .+"):
        decode_image(_encoded(Image.new("RGB", (8, 8)), "PNG")[:20])  # the header cut short
    with pytest.raises(InvalidImageError, match="^not a recognised image format$"):
        decode_image(b"GIF89a")


def test_empty_and_missing_files_are_errors_naming_them(tmp_path: Path) -> None:
    from vit_service.preprocessing import open_image

    with pytest.raises(InvalidImageError, match="^empty file$"):
        decode_image(b"")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InvalidImageError, match=f"^{tmp_path / 'empty.jpg'}: empty file$"):
        open_image(tmp_path / "empty.jpg")
    (tmp_path / "one.jpg").write_bytes(b"x")
    with pytest.raises(InvalidImageError, match=f"^{tmp_path / 'one.jpg'}: not a recognised image format$"):
        open_image(tmp_path / "one.jpg")
    with pytest.raises(InvalidImageError, match=f"^{tmp_path / 'nope.jpg'}: No such file or directory$"):
        open_image(tmp_path / "nope.jpg")


def test_listing_follows_symlinked_folders_and_skips_hidden_ones(tmp_path: Path) -> None:
    from vit_service.preprocessing import list_images

    elsewhere = tmp_path / "elsewhere"
    for path in (elsewhere / "x.jpg", tmp_path / "data" / "a" / "y.png", tmp_path / "data" / ".cache" / "z.jpg",
                 tmp_path / "data" / "a" / ".hidden.jpg", tmp_path / "data" / "a" / "notes.txt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (tmp_path / "data" / "linked").symlink_to(elsewhere)  # a dataset assembled from links
    root = tmp_path / "data"
    assert list_images(root) == [str(root / "a" / "y.png"), str(root / "linked" / "x.jpg")]


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
