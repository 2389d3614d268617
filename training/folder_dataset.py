"""ImageNet-style folders (root/<class>/**/*.jpg): scanning, a skip-tolerant Dataset, and verify.

Layout mistakes (no class folders, an empty class, train and val with different classes) are
DatasetErrors raised while scanning, before training starts. A file that fails to decode is a
runtime matter: the Dataset skips it with one warning and serves the next readable image, so one
bad JPEG among a million never ends an epoch; `vit-data verify` finds all of them up front.
"""

from __future__ import annotations

import multiprocessing
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset

from vit_service.preprocessing import (DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, InvalidImageError, is_image_file,
                                       list_images, open_image)

SPLIT_NAMES = ("train", "val", "test")
MAX_REPLACEMENT_TRIES = 64  # unreadable files in a row before __getitem__ gives up


class DatasetError(ValueError):
    """The folder layout cannot be used for training; the message names the folder."""


class SkippedImageWarning(UserWarning):
    """An unreadable image was skipped (warned once per file)."""


def find_classes(root: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the class folders in `root` (hidden folders ignored)."""
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: dataset folder not found" if not os.path.exists(root)
                           else f"{root}: not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class name>/<images>)")
    return classes


def scan_image_folder(root: str | os.PathLike[str], class_names: list[str] | None = None) -> list[tuple[str, int]]:
    """(path, label) for every image file under root/<class>/, sorted; label indexes class_names.

    With `class_names` (train's classes, applied to val) the folder must hold exactly those classes.
    """
    found = find_classes(root)
    if class_names is None:
        class_names = found
    else:
        missing = sorted(set(class_names) - set(found))
        extra = sorted(set(found) - set(class_names))
        if missing or extra:
            raise DatasetError(f"{root}: class folders differ from the expected {len(class_names)} classes"
                               f" (missing: {missing or 'none'}; extra: {extra or 'none'})")
    files = {name: list_images(os.path.join(root, name)) for name in class_names}
    empty = [name for name, paths in files.items() if not paths]
    if len(empty) == len(files):
        raise DatasetError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if empty:
        raise DatasetError(f"{root}: class folder(s) without images: {', '.join(empty)}")
    return [(path, label) for label, name in enumerate(class_names) for path in files[name]]


class ImageFolderDataset(Dataset):
    """root/<class>/**/<image> as (transform(rgb_image), label), skipping unreadable files.

    Which files were skipped lives in a shared-memory flag array, created here and so inherited by
    DataLoader workers (fork) or pickled to them at start (spawn/forkserver): the main process sees
    every worker's skips, each file is warned about once in all, and a known-bad file is not
    decoded again in later epochs.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Any] | None = None,
        class_names: list[str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft_size: int | None = None,
    ) -> None:
        """`draft_size`: decode JPEGs at reduced scale down to about this size, as serving does
        (pass the eval preprocessing's resize_size for validation, None for training crops)."""
        self.root = str(root)
        self.class_names = list(class_names) if class_names is not None else find_classes(root)
        self.samples = scan_image_folder(root, self.class_names)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        self._bad = _shared_flags(bytes(len(self.samples)))

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            # Pickled for something other than starting a worker (deepcopy, a cache): shared memory
            # cannot travel that way, so the copy gets its own flags, starting from ours.
            state["_bad"] = bytes(self._bad.get_obj())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_bad"], bytes):
            state["_bad"] = _shared_flags(state["_bad"])
        self.__dict__.update(state)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        flags = self._bad.get_obj()  # unlocked reads are fine: a flag only ever goes 0 -> 1
        tries = 0
        for step in range(n):
            i = (index + step) % n  # the replacement is the next readable index: deterministic
            if flags[i]:
                continue
            path, label = self.samples[i]
            try:
                img = open_image(path, max_pixels=self.max_pixels, draft_size=self.draft_size)
            except InvalidImageError as e:
                self._mark_bad(i, str(e))
                tries += 1
                if tries >= MAX_REPLACEMENT_TRIES:
                    break
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise DatasetError(f"{self.root}: no readable image at or after index {index % n} "
                           f"({self.num_skipped} of {n} files unreadable so far); "
                           f"run `vit-data verify {self.root}` to list them")

    def _mark_bad(self, i: int, reason: str) -> None:
        with self._bad.get_lock():
            first = not self._bad[i]
            self._bad[i] = 1
        if first:
            warnings.warn(f"skipping unreadable image {reason}", SkippedImageWarning, stacklevel=2)

    @property
    def num_skipped(self) -> int:
        """Distinct unreadable files met so far, in this process and all loader workers."""
        return int(np.frombuffer(self._bad.get_obj(), dtype=np.uint8).sum())

    @property
    def skipped_files(self) -> list[str]:
        """Paths of the unreadable files met so far (also those met in loader workers)."""
        bad = np.flatnonzero(np.frombuffer(self._bad.get_obj(), dtype=np.uint8))
        return [self.samples[i][0] for i in bad]


def _shared_flags(initial: bytes) -> Any:
    # A spawn-context lock can also be shared with fork and forkserver workers; a fork-context
    # one cannot be sent to spawned workers.
    flags = multiprocessing.get_context("spawn").Array("B", len(initial))
    flags.get_obj()[:] = initial
    return flags


@dataclass
class SplitReport:
    name: str  # "train", "val", "test", or "" when the dataset root is itself the only split
    root: str
    class_counts: dict[str, int]  # image files per class, readable or not
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def num_images(self) -> int:
        return sum(self.class_counts.values())


@dataclass
class VerifyReport:
    root: str
    splits: list[SplitReport]
    problems: list[str] = field(default_factory=list)  # class lists differ, empty class folders

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        return [u for s in self.splits for u in s.unreadable]

    @property
    def num_images(self) -> int:
        return sum(s.num_images for s in self.splits)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unreadable


def verify_dataset(root: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS,
                   workers: int = 1) -> VerifyReport:
    """Decodes every image under root (or root/{train,val,test}) and reports counts and failures.

    Raises DatasetError when the root or a split has no class folders or no images at all;
    empty class folders and class lists that differ between splits are listed in `problems`.
    `workers` threads decode in parallel (Pillow releases the GIL while decoding).
    """
    root = str(root)
    find_classes(root)  # a missing root, or one without subfolders, raises here
    split_names = [s for s in SPLIT_NAMES if os.path.isdir(os.path.join(root, s))]
    split_dirs = [(s, os.path.join(root, s)) for s in split_names] or [("", root)]
    report = VerifyReport(root, [])
    reference: tuple[str, list[str]] | None = None
    for name, split_root in split_dirs:
        classes = find_classes(split_root)
        files = {c: list_images(os.path.join(split_root, c)) for c in classes}
        if not any(files.values()):
            scan_image_folder(split_root)  # raises the "no images" error
        empty = [c for c, paths in files.items() if not paths]
        if empty:
            report.problems.append(f"{split_root}: class folder(s) without images: {', '.join(empty)}")
        if reference is None:
            reference = (name, classes)
        elif classes != reference[1]:
            missing = sorted(set(reference[1]) - set(classes))
            extra = sorted(set(classes) - set(reference[1]))
            report.problems.append(f"{split_root}: classes differ from {reference[0]}"
                                   f" (missing: {missing or 'none'}; extra: {extra or 'none'})")
        paths = [p for c in classes for p in files[c]]
        with ThreadPoolExecutor(max(1, workers)) as pool:
            reasons = list(pool.map(lambda p: _decode_error(p, max_pixels), paths))
        report.splits.append(SplitReport(
            name, split_root, {c: len(files[c]) for c in classes},
            [(p, r) for p, r in zip(paths, reasons) if r is not None],
        ))
    return report


def _decode_error(path: str, max_pixels: int) -> str | None:
    try:
        open_image(path, max_pixels=max_pixels)
    except InvalidImageError as e:
        message = str(e)
        return message[len(path) + 2:] if message.startswith(f"{path}: ") else message
    return None


__all__ = [
    "IMAGE_EXTENSIONS", "DatasetError", "SkippedImageWarning", "ImageFolderDataset", "SplitReport",
    "VerifyReport", "find_classes", "is_image_file", "scan_image_folder", "verify_dataset",
]
