"""`vit-data cifar10`: the official python-version archive (or torchvision's folder) -> JPEG class
folders, on a tiny archive built here in that exact format (no download)."""

from __future__ import annotations

import io
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli, run_cli_in_process
from training.cifar10 import TRAIN_BATCHES

NAMES = ["airplane", "automobile", "bird"]
PER_BATCH = 4


def _batch(seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    labels = [int(v) for v in rng.integers(0, len(NAMES), PER_BATCH)]
    # Each image one flat colour per channel, so a JPEG round trip keeps it within a few levels.
    colours = rng.integers(0, 256, (PER_BATCH, 3), dtype=np.uint8)
    data = np.repeat(colours[:, :, None], 1024, axis=2).reshape(PER_BATCH, 3072)  # R plane, G plane, B plane
    return {b"batch_label": f"batch {seed}".encode(), b"labels": labels, b"data": data,
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(PER_BATCH)]}


def _write_batches(folder: Path) -> dict[str, dict]:
    folder.mkdir(parents=True)
    batches = {name: _batch(i) for i, name in enumerate([*TRAIN_BATCHES, "test_batch"])}
    files = {**batches, "batches.meta": {b"label_names": [n.encode() for n in NAMES], b"num_cases_per_batch": 4}}
    for name, d in files.items():
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    (folder / "readme.html").write_text("<html></html>")
    return batches


@pytest.fixture()
def archive(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """cifar-10-python.tar.gz as the CIFAR site ships it: one cifar-10-batches-py/ folder inside."""
    batches = _write_batches(tmp_path / "src" / "cifar-10-batches-py")
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return path, batches


def _check_output(out: Path, batches: dict[str, dict]) -> None:
    for split, names in (("train", TRAIN_BATCHES), ("test", ("test_batch",))):
        expected = [(NAMES[lbl], batches[b][b"data"][i].reshape(3, 1024)[:, 0]) for b in names
                    for i, lbl in enumerate(batches[b][b"labels"])]
        files = sorted((out / split).glob("*/*.jpg"), key=lambda p: p.name)
        assert [p.parent.name for p in files] == [cls for cls, _ in expected]
        for path, (_, rgb) in zip(files, expected):
            pixels = np.asarray(Image.open(path).convert("RGB"))
            assert pixels.shape == (32, 32, 3)
            assert np.abs(pixels.astype(int) - rgb.astype(int)).max() <= 3, path  # channel order kept
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(NAMES)
    assert not (out / "val").exists()  # configs/cifar10*.yaml validate on test/


def test_archive_becomes_class_folders(archive: tuple[Path, dict], tmp_path: Path) -> None:
    path, batches = archive
    out = tmp_path / "data" / "cifar10"
    result = run_cli("vit-data", "cifar10", str(path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"train: {5 * PER_BATCH} images" in result.stdout and f"test: {PER_BATCH} images" in result.stdout
    _check_output(out, batches)
    again = run_cli_in_process("vit-data", "cifar10", str(path), "--out", str(out))  # never over an earlier copy
    assert again.returncode == 2 and "already holds files" in again.stderr


def test_torchvision_download_folder(tmp_path: Path) -> None:
    from training.data_cli import main

    batches = _write_batches(tmp_path / "torchvision" / "cifar-10-batches-py")
    assert main(["cifar10", str(tmp_path / "torchvision"), "--out", str(tmp_path / "out")]) == 0
    _check_output(tmp_path / "out", batches)


def test_class_folders_given_as_the_archive_are_named_usable_as_they_are(tmp_path: Path) -> None:
    # A newcomer points vit-data cifar10 at the JPEG folders it wrote (or a copy of them): the
    # error says they need no conversion and names the --data options that read them.
    from training.data_cli import main
    from training.folder_dataset import find_classes

    converted = tmp_path / "cifar10"
    _write_batches(tmp_path / "src" / "cifar-10-batches-py")
    assert main(["cifar10", str(tmp_path / "src"), "--out", str(converted)]) == 0
    for given, expected in ((converted, {"train_dir": "train", "val_dir": "test", "test_dir": "test"}),
                            (converted / "train", {"train_dir": ""})):
        result = run_cli_in_process("vit-data", "cifar10", str(given), "--out", str(tmp_path / "out"))
        assert result.returncode == 2, result.stdout + result.stderr  # an error, as before
        assert "already holds image class folders" in result.stderr and "Traceback" not in result.stderr
        options = dict(re.findall(r"--data\.(\w+_dir) (\S+)", result.stderr))
        assert options == {k: str(given / v) if v else str(given) for k, v in expected.items()}, result.stderr
        for folder in options.values():  # the folders it names are the class folders themselves
            assert sorted(p.name for p in Path(folder).iterdir()) == sorted(NAMES)
            assert find_classes(folder) == sorted(NAMES) and list(Path(folder).glob("*/*.jpg"))
        assert not (tmp_path / "out").exists()


def _tar_with(tmp_path: Path, files: dict[str, bytes]) -> Path:
    path = tmp_path / "bad.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.tar.gz", "no such file or folder"),
    (lambda d: (d / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a tar") and d / "photo.jpg",
     "not a CIFAR-10 archive"),
    (lambda d: _tar_with(d, {"cifar-10-batches-bin/data_batch_1.bin": b"\0" * 3073}), "binary version"),
    (lambda d: _tar_with(d, {"cifar-10-batches-py/data_batch_1": b"x"}), "missing data_batch_2"),
    (lambda d: _tar_with(d, {f"cifar-10-batches-py/{n}": pickle.dumps(_Evil()) for n in
                             [*TRAIN_BATCHES, "test_batch", "batches.meta"]}), "refusing to load"),
])
def test_wrong_input_is_one_clear_error(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path)
    result = run_cli_in_process("vit-data", "cifar10", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"vit-data: error: {path}") and message in result.stderr
    assert "Traceback" not in result.stderr and "pwned" not in result.stdout
