"""Streaming shards with LitData (Lightning's streaming data engine), for data that outgrows one
disk or one machine: an ImageNet-style folder -> chunks of encoded images + labels, read back by
LitData's StreamingDataset / StreamingDataLoader from a local folder or an s3:// / gs:// URI.

A shard folder holds LitData's index.json and chunk-*.bin files, plus ours: classes.json (the class
list, in label order) and skipped.tsv (files that could not be decoded, with the reason).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

from litdata import StreamingDataset, optimize
from PIL import Image

from training.folder_dataset import DatasetError, find_classes, scan_image_folder
from vit_service.preprocessing import DEFAULT_MAX_PIXELS, InvalidImageError, decode_image, open_image

CLASSES_FILE = "classes.json"
SKIPPED_FILE = "skipped.tsv"
REMOTE_PREFIXES = ("s3://", "gs://")


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES)


def is_shard_dir(path: str | os.PathLike[str]) -> bool:
    """A LitData shard folder (local with index.json, or any s3:// / gs:// URI)."""
    path = str(path)
    return is_remote(path) or os.path.isfile(os.path.join(path, "index.json"))


def _encode_sample(item: tuple[int, str, int], root: str, max_side: int | None, failures: str) -> Iterator[dict]:
    """One file -> one sample, or nothing (the reason goes to this worker's failure file)."""
    index, path, label = item
    try:
        img = open_image(path)  # decodes fully: a truncated file fails here, not mid-training
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)  # keeps the aspect ratio
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=90)
            data = buffer.getvalue()
        else:
            data = Path(path).read_bytes()  # unchanged bytes: no second JPEG loss
    except (InvalidImageError, OSError) as e:
        reason = str(e).removeprefix(f"{path}: ").replace("\t", " ").replace("\n", " ")
        with open(os.path.join(failures, f"{os.getpid()}.tsv"), "a") as f:
            f.write(f"{path}\t{reason}\n")
        return
    yield {"image": data, "label": label, "id": index, "path": os.path.relpath(path, root)}


def optimize_folder(src_dir: str, out: str, workers: int = 1, max_side: int | None = None,
                    chunk_bytes: str = "64MB") -> tuple[int, list[tuple[str, str]]]:
    """Writes shards of src_dir's images to `out`; returns (samples written, [(path, reason) skipped])."""
    class_names = find_classes(src_dir)
    samples = scan_image_folder(src_dir, class_names)
    if not is_remote(out) and os.path.exists(os.path.join(out, "index.json")):
        raise DatasetError(f"{out}: already holds shards; remove it or choose another output folder")
    inputs = [(i, path, label) for i, (path, label) in enumerate(samples)]
    with tempfile.TemporaryDirectory(prefix="vit-optimize-") as failures:
        optimize(fn=partial(_encode_sample, root=str(src_dir), max_side=max_side, failures=failures),
                 inputs=inputs, output_dir=out, num_workers=workers, chunk_bytes=chunk_bytes,
                 reorder_files=False, start_method="fork" if os.name == "posix" else None,
                 # verbose=False: LitData's own progress bar (escape codes in a log) and its
                 # "Create an account on https://lightning.ai/" line; vit-data prints the outcome.
                 verbose=False)
        skipped = sorted(tuple(line.rstrip("\n").split("\t", 1)) for f in sorted(os.listdir(failures))
                         for line in open(os.path.join(failures, f)))
    meta = {"class_names": class_names, "num_samples": len(samples) - len(skipped), "source": str(src_dir),
            "max_side": max_side}
    _write_beside(out, {CLASSES_FILE: json.dumps(meta, indent=1) + "\n",
                        SKIPPED_FILE: "".join(f"{p}\t{r}\n" for p, r in skipped)})
    return len(samples) - len(skipped), skipped


def _write_beside(out: str, files: dict[str, str]) -> None:
    if not is_remote(out):
        for name, text in files.items():
            Path(out, name).write_text(text)
        return
    from litdata.streaming.fs_provider import _get_fs_provider  # LitData's own s3/gs client

    provider = _get_fs_provider(out)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            Path(tmp, name).write_text(text)
            provider.upload_file(os.path.join(tmp, name), f"{out.rstrip('/')}/{name}")


def shard_class_names(shard_dir: str) -> list[str]:
    """The class list stored beside the shards by `vit-data optimize`."""
    try:
        if is_remote(shard_dir):
            from litdata.streaming.fs_provider import _get_fs_provider

            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, CLASSES_FILE)
                _get_fs_provider(shard_dir).download_file(f"{shard_dir.rstrip('/')}/{CLASSES_FILE}", local)
                text = Path(local).read_text()
        else:
            text = Path(shard_dir, CLASSES_FILE).read_text()
        return list(json.loads(text)["class_names"])
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(f"{shard_dir}: no readable {CLASSES_FILE} beside the shards "
                           f"(write shards with `vit-data optimize`): {e}") from None


def check_same_classes(where: str, found: list[str], expected: list[str]) -> None:
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        raise DatasetError(f"{where}: classes differ from the expected {len(expected)} classes"
                           f" (missing: {missing or 'none'}; extra: {extra or 'none'}"
                           + ("; same names in another order" if not missing and not extra else "") + ")")


class ShardDataset(StreamingDataset):
    """LitData's StreamingDataset over our shards, yielding (transform(rgb_image), label), or
    (…, label, sample id) with return_ids (the id is the file's index in the sorted source folder)."""

    def __init__(self, shard_dir: str, transform: Callable[[Any], Any] | None, shuffle: bool, seed: int = 42,
                 draft_size: int | None = None, return_ids: bool = False, **kwargs: Any) -> None:
        super().__init__(shard_dir, shuffle=shuffle, seed=seed, **kwargs)
        self.image_transform = transform
        self.draft_size = draft_size
        self.return_ids = return_ids

    def __getitem__(self, index: Any) -> tuple:
        item = super().__getitem__(index)
        img = decode_image(item["image"], max_pixels=DEFAULT_MAX_PIXELS, draft_size=self.draft_size)
        x = self.image_transform(img) if self.image_transform is not None else img
        return (x, item["label"], item["id"]) if self.return_ids else (x, item["label"])


# Lightning warns about any IterableDataset with a __len__ that several loader workers could
# duplicate samples. Not ours: LitData's StreamingDataset hands each rank and each worker a disjoint
# part of the chunks, so __len__ is exact and an epoch has no duplicates (tests/test_shards.py
# checks it with workers and 2 DDP processes). Filtered by its exact text, nothing else.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


__all__ = ["is_shard_dir", "optimize_folder", "shard_class_names", "ShardDataset", "check_same_classes"]
