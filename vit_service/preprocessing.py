"""Image decoding and eval preprocessing, shared by training (validation) and serving.

Training's validation loader and the HTTP service both call `Preprocessing`, and the exported
model carries its settings, so what the model saw at validation is exactly what it sees in
production.

Serving splits the transform in two: `to_uint8` (decode-side, per image, on the CPU) and
`normalize` (model-side, per batch, on the model's device), so a batch crosses to the GPU as
uint8, a quarter of the bytes of float32. `__call__` composes the same two steps for training.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
# ImageFile.LOAD_TRUNCATED_IMAGES stays False: a truncated file must be an error, not grey pixels.
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 40_000_000  # ~ 8000 x 5000; larger uploads are refused as decompression bombs
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file name looks like an image (by extension; hidden files never do)."""
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike[str]) -> list[str]:
    """Every image file under `folder` (recursively, hidden folders skipped), sorted."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # prunes the walk too
        paths += [os.path.join(dirpath, f) for f in filenames if is_image_file(f)]
    return sorted(paths)

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class InvalidImageError(ValueError):
    """The bytes or file are not an image this project can use; the message says why."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decodes encoded image bytes into an 8-bit RGB image, or raises InvalidImageError.

    Applies the EXIF orientation, takes the first frame of animations, flattens transparency
    onto white and converts grayscale, palette, CMYK and 16-bit images to RGB.
    `draft_size` lets JPEG decode at a reduced scale (DCT scaling) when the image will be
    resized down to about that size anyway: several times faster for large photos.
    """
    if not data:
        raise InvalidImageError("empty file")
    return _open(io.BytesIO(data), max_pixels, draft_size)


def open_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
               draft_size: int | None = None) -> Image.Image:
    """Like `decode_image` for a file on disk; errors name the file."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise InvalidImageError("empty file")
            return _open(f, max_pixels, draft_size)
    except InvalidImageError as e:
        raise InvalidImageError(f"{path}: {e}") from None
    except OSError as e:
        raise InvalidImageError(f"{path}: {e.strerror or e}") from None


def _open(fp: Any, max_pixels: int, draft_size: int | None) -> Image.Image:
    try:
        img = Image.open(fp)  # reads the header only
    except Image.DecompressionBombError:
        raise InvalidImageError(f"image dimensions exceed the limit of {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise InvalidImageError("not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidImageError(f"cannot read image: {e}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))  # keeps both sides >= draft_size
        img.load()  # Image.open is lazy: truncated or corrupt data fails here
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        raise InvalidImageError(f"corrupt or truncated image data ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) grayscale: scale to 8 bits rather than clip at 255.
        arr = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16).astype(np.float32)
        peak = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8), "L")
    # a palette, grayscale or RGB image with a transparent colour key (PNG tRNS, GIF) is transparent too
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class Preprocessing:
    """Eval transform: resize the shorter side to image_size / crop_pct, centre-crop, normalise.

    crop_mode "squash" (timm's name) resizes both sides to image_size / crop_pct, ignoring the
    aspect ratio, then centre-crops; with crop_pct 1 it is Hugging Face's ViTImageProcessor.
    """

    image_size: int
    crop_pct: float = 0.875
    interpolation: Literal["bilinear", "bicubic", "nearest", "lanczos"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_mode: Literal["center", "squash"] = "center"

    def __post_init__(self) -> None:
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"crop_mode must be 'center' or 'squash', got {self.crop_mode!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def resize_size(self) -> int:
        return int(self.image_size / self.crop_pct)  # floor, as timm's eval transform

    def geometry(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
        """The eval geometry of a width x height image, the one place it is computed:
        ((resized width, resized height), (left, top, right, bottom) of the crop in the resized image)."""
        short = self.resize_size
        if self.crop_mode == "squash":  # both sides to `short`, ignoring the aspect ratio
            new_w, new_h = short, short
        elif width <= height:  # shorter side to `short` (torchvision's Resize(int) rounding)
            new_w, new_h = short, max(1, int(short * height / width))
        else:
            new_w, new_h = max(1, int(short * width / height)), short
        s = self.image_size
        left, top = int(round((new_w - s) / 2.0)), int(round((new_h - s) / 2.0))
        return (new_w, new_h), (left, top, left + s, top + s)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The (left, top, right, bottom) region of a width x height image that the model sees,
        in the image's own pixels (where attention maps are drawn)."""
        (new_w, new_h), (left, top, right, bottom) = self.geometry(width, height)
        sx, sy = width / new_w, height / new_h
        return (left * sx, top * sy, right * sx, bottom * sy)

    def resize_crop(self, img: Image.Image) -> Image.Image:
        size, box = self.geometry(*img.size)
        if size != img.size:
            img = img.resize(size, _RESAMPLE[self.interpolation])
        return img.crop(box)

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, S, S) uint8 tensor, resized and cropped."""
        arr = np.asarray(self.resize_crop(img), dtype=np.uint8)  # (S, S, 3)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, S, S)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) or (3, S, S) uint8 -> float32 normalised with mean/std."""
        mean = torch.tensor(self.mean, device=x.device).view(-1, 1, 1) * 255.0
        std = torch.tensor(self.std, device=x.device).view(-1, 1, 1) * 255.0
        return (x.float() - mean) / std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, S, S) float tensor: the eval transform used by validation."""
        return self.normalize(self.to_uint8(img))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


__all__ = ["Preprocessing", "InvalidImageError", "decode_image", "open_image", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS",
           "is_image_file", "list_images"]
