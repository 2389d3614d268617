"""Small datasets decoded once into memory, augmented a whole batch at a time on the device.

For a dataset the size of CIFAR-10 (50,000 images, 150 MB as 32 px uint8) the per-image pipeline
(open, decode, crop, flip, to-tensor, normalise in a loader worker) costs more CPU than a small
ViT's training step at low resolution, and its worker competes with the step for the same cores
(measured in bench/README.md). Here every training image is decoded once, at the start, into one
uint8 tensor; the loader only indexes it (no workers), and the random resized crop, flip,
normalisation and random erasing run on the whole batch after it reaches the device, in a few
tensor ops, as fast GPU data pipelines do. Validation and test keep the folder pipeline, which
decodes exactly as the service does. Under DDP each process holds its own copy.

Deliberately not timm's per-image transform: timm has no batched random resized crop. The crop is
`torchvision.ops.roi_align` (bilinear, averaging over each output pixel's footprint when it
shrinks), one box per image, drawn from timm's scale/ratio distribution; random erasing is timm's.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torchvision.ops import roi_align

from training.folder_dataset import DatasetError, SkippedImageWarning
from vit_service.preprocessing import InvalidImageError, Preprocessing, open_image

MEMORY_SHARE_LIMIT = 0.5  # refuse to hold more than this share of the available RAM


class DecodedImages(Dataset):
    """(path, label) samples decoded once into a (N, 3, S, S) uint8 tensor; items are
    (uint8 image, label). Unreadable files are dropped at decode time, warned about and counted."""

    def __init__(self, samples: list[tuple[str, int]], size: int, interpolation: str = "bicubic",
                 root: str = "", workers: int | None = None) -> None:
        """`size`: stored side; the shorter side is resized to it and the centre square kept."""
        self.root = root
        needed = len(samples) * 3 * size * size
        available = _available_memory()
        if available is not None and needed > MEMORY_SHARE_LIMIT * available:
            raise DatasetError(
                f"{root}: {len(samples)} images at {size} px need {needed / 2**30:.1f} GiB in memory, more than "
                f"{MEMORY_SHARE_LIMIT:.0%} of the {available / 2**30:.1f} GiB available; use --data.in_memory false")
        resize = Preprocessing(size, crop_pct=1.0, interpolation=interpolation)

        def decode(sample: tuple[str, int]) -> torch.Tensor | str:
            try:
                return resize.to_uint8(open_image(sample[0]))  # (3, S, S)
            except InvalidImageError as e:
                return str(e)

        start = time.perf_counter()
        # Pillow releases the GIL while decoding and resizing, so threads use every core.
        with ThreadPoolExecutor(workers or len(os.sched_getaffinity(0))) as pool:
            decoded = list(pool.map(decode, samples, chunksize=256))
        self.skipped_files = [path for (path, _), d in zip(samples, decoded) if isinstance(d, str)]
        for reason in (d for d in decoded if isinstance(d, str)):
            warnings.warn(f"skipping unreadable image {reason}", SkippedImageWarning, stacklevel=2)
        kept = [(d, label) for d, (_, label) in zip(decoded, samples) if not isinstance(d, str)]
        if not kept:
            raise DatasetError(f"{root}: none of the {len(samples)} images could be decoded")
        self.images = torch.stack([d for d, _ in kept])  # (N, 3, S, S) uint8
        self.targets = torch.tensor([label for _, label in kept])  # (N,)
        skipped = f", {len(self.skipped_files)} unreadable skipped" if self.skipped_files else ""
        rank_zero_info(f"in memory: decoded {len(kept)} training images from {root or 'the samples'} into "
                       f"{self.images.nbytes / 2**20:.1f} MiB (uint8, {size} px) in "
                       f"{time.perf_counter() - start:.1f} s{skipped}")

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)


class BatchAugment(torch.nn.Module):
    """uint8 (B, 3, H, W) batch -> augmented, normalised float (B, 3, size, size), on its device."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float], hflip: float,
                 mean: tuple[float, float, float], std: tuple[float, float, float], re_prob: float = 0.0) -> None:
        super().__init__()
        self.size, self.scale, self.hflip = size, tuple(scale), hflip
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.re_prob = re_prob

    def crop_boxes(self, batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """One random box per image, as (B, 5) [index, x1, y1, x2, y2]: area share uniform in
        `scale`, log aspect ratio uniform in `ratio` (timm's RandomResizedCrop distribution, with
        boxes clipped to the image instead of timm's redraws), position uniform."""
        area = torch.empty(batch, device=device).uniform_(*self.scale) * height * width
        aspect = torch.empty(batch, device=device).uniform_(*self.log_ratio).exp()
        w = (area * aspect).sqrt().clamp(max=width)
        h = (area / aspect).sqrt().clamp(max=height)
        x1 = torch.rand(batch, device=device) * (width - w)
        y1 = torch.rand(batch, device=device) * (height - h)
        index = torch.arange(batch, device=device, dtype=w.dtype)
        return torch.stack([index, x1, y1, x1 + w, y1 + h], dim=1)  # (B, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape  # (B, 3, H, W) uint8
        x = images.float()
        boxes = self.crop_boxes(b, h, w, x.device)
        # aligned=True: a box [0, 0, W, H] samples pixel centres exactly (no half-pixel shift);
        # sampling_ratio=-1 averages ceil(box / size) points per output pixel when shrinking.
        x = roi_align(x, boxes, output_size=self.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        if self.hflip > 0:
            flip = torch.rand(b, device=x.device) < self.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # (B, 3, size, size)
        x = (x - self.mean) / self.std
        if self.re_prob > 0:
            # timm's RandomErasing takes a batch and erases each image with its own probability.
            x = RandomErasing(self.re_prob, mode="pixel", device=str(x.device))(x)
        return x


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


__all__ = ["BatchAugment", "DecodedImages"]
