"""CIFAR-10 as users download it -> the JPEG class folders this project trains on.

The python version of CIFAR-10 (cifar-10-python.tar.gz, Krizhevsky 2009; torchvision's
`CIFAR10(download=True)` fetches the same file and unpacks it to cifar-10-batches-py/) holds six
pickled batches, each a dict with b"data" (N x 3072 uint8: the 1024 red, then green, then blue
values of a 32x32 image, row-major) and b"labels", plus batches.meta with b"label_names".
data_batch_1..5 are the 50,000 training images, test_batch the 10,000 test images.

The batches are unpickled with an allow-list (dicts, lists, bytes and numpy arrays only): an
archive is data, and a pickle can otherwise run code.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.folder_dataset import DatasetError, is_image_file

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
SPLITS = {"train": TRAIN_BATCHES, "test": (TEST_BATCH,)}  # the test batch -> test/, as configs/cifar10*.yaml read it
_NEEDED = (*TRAIN_BATCHES, TEST_BATCH, META)
_WHAT = f"expected the CIFAR-10 python version (cifar-10-python.tar.gz from {CIFAR10_URL}) or its cifar-10-batches-py/ folder"


class _ArraysOnly(pickle.Unpickler):
    """Resolves only what numpy arrays need; anything else in the pickle is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"),
                ("_codecs", "encode")}  # how a Python 3 protocol-2 pickle spells bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_batches(source: str | os.PathLike[str]) -> dict[str, bytes]:
    """The raw bytes of the six batches and batches.meta, from the archive or an extracted folder."""
    path = Path(source)
    if path.is_dir():
        folder = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        found = {name: (folder / name).read_bytes() for name in _NEEDED if (folder / name).is_file()}
        if not found and (hint := _class_folders_hint(path)):
            raise DatasetError(hint)
        return _complete(found, path, bin_version=(folder / "data_batch_1.bin").is_file())
    if not path.is_file():
        raise DatasetError(f"{path}: no such file or folder ({_WHAT})")
    try:
        with tarfile.open(path) as tar:
            found, bin_version = {}, False
            for member in tar.getmembers():
                name = Path(member.name).name
                bin_version |= name == "data_batch_1.bin"
                if member.isfile() and name in _NEEDED:
                    found[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"{path}: not a CIFAR-10 archive ({type(e).__name__}: {e}); {_WHAT}") from None
    return _complete(found, path, bin_version)


def _holds_class_folders(folder: Path) -> bool:
    """True when some subfolder of `folder` holds image files (an ImageFolder-style split)."""
    return any(sub.is_dir() and any(is_image_file(f) for f in sub.iterdir()) for sub in folder.iterdir())


def _class_folders_hint(path: Path) -> str:
    """What to do with a folder that is already what `vit-data cifar10` writes (train/ and test/
    of class folders, or one such split); "" when it is not."""
    splits = [s for s in ("train", "test", "val") if (path / s).is_dir() and _holds_class_folders(path / s)]
    if "train" in splits and len(splits) > 1:
        held = "test" if "test" in splits else "val"  # the CIFAR-10 configs validate on test/
        return (f"{path} already holds image class folders (train/<class>/, {held}/<class>/), nothing to convert: "
                f"use it as it is with --data.train_dir {path}/train --data.val_dir {path}/{held} "
                f"--data.test_dir {path}/{held}")
    if _holds_class_folders(path):
        return (f"{path} already holds image class folders (<class>/*.jpg), nothing to convert: "
                f"use it as it is with --data.train_dir {path} (or as --data.val_dir, --data.test_dir)")
    return ""


def _complete(found: dict[str, bytes], path: Path, bin_version: bool) -> dict[str, bytes]:
    if bin_version and not found:
        raise DatasetError(f"{path}: the binary version of CIFAR-10 (data_batch_1.bin); {_WHAT}")
    missing = [name for name in _NEEDED if name not in found]
    if missing:
        raise DatasetError(f"{path}: missing {', '.join(missing)}; {_WHAT}")
    return found


def _unpickle(raw: bytes, name: str, path: Path) -> dict[bytes, Any]:
    try:
        d = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a corrupt or foreign pickle fails in many ways
        raise DatasetError(f"{path}: {name} is not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: {name} is not a CIFAR-10 batch (a {type(d).__name__}, not a dict)")
    return d


def decode_batch(raw: bytes, name: str, path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> images (N, 32, 32, 3) uint8 and labels (N,)."""
    d = _unpickle(raw, name, path)
    if b"data" not in d or b"labels" not in d:
        raise DatasetError(f"{path}: {name} has no b'data' and b'labels' (keys: {sorted(map(repr, d))})")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetError(f"{path}: {name} holds data of shape {data.shape} and {len(labels)} labels; "
                           "expected N x 3072 and N labels")
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise DatasetError(f"{path}: {name} has labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # (N, 32, 32, 3)


def convert_cifar10(source: str | os.PathLike[str], out: str | os.PathLike[str], quality: int = 95) -> dict[str, int]:
    """Writes out/train/<class>/NNNNN.jpg and out/test/<class>/NNNNN.jpg; returns images per split."""
    path, out = Path(source), Path(out)
    for split in SPLITS:
        if (out / split).is_dir() and any((out / split).iterdir()):
            raise DatasetError(f"{out / split}: already holds files; remove it or choose another --out")
    raw = read_batches(path)
    meta = _unpickle(raw[META], META, path)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])]
    if not names or len(set(names)) != len(names) or any(not n or "/" in n or n.startswith(".") for n in names):
        raise DatasetError(f"{path}: {META} has no usable b'label_names' (got {names})")
    counts = {}
    for split, batches in SPLITS.items():
        for name in names:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        index = 0
        for batch in batches:
            images, labels = decode_batch(raw[batch], batch, path, len(names))
            for image, label in zip(images, labels):
                Image.fromarray(image).save(out / split / names[label] / f"{index:05d}.jpg", quality=quality)
                index += 1
        counts[split] = index
    return counts


__all__ = ["convert_cifar10", "read_batches", "decode_batch", "CIFAR10_URL"]
