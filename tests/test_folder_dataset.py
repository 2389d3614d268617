"""Folder scanning, the skip-tolerant ImageFolderDataset, verify_dataset and the `vit-data` CLI."""

from __future__ import annotations

import copy
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data_cli import main
from training.folder_dataset import (
    DatasetError, ImageFolderDataset, SkippedImageWarning, find_classes, scan_image_folder, verify_dataset,
)
from vit_service.preprocessing import Preprocessing


def _save(path: Path, img: Image.Image | None = None, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (img or Image.new("RGB", (24, 16), (10, 120, 200))).save(path, **save_args)
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    return path


def _truncated(path: Path) -> Path:
    good = _save(path.with_name("full_" + path.name), Image.effect_noise((64, 64), 60).convert("RGB"))
    data = good.read_bytes()
    good.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


# --- scanning ---------------------------------------------------------------------------------

def test_scan_finds_images_recursively_and_ignores_the_rest(tmp_path: Path) -> None:
    _save(tmp_path / "b_dog" / "x.JPG")
    _save(tmp_path / "b_dog" / "sub" / "y.png")
    _save(tmp_path / "a_cat" / "z.jpeg")
    _save(tmp_path / "a_cat" / "w.TIFF")
    _save(tmp_path / "a_cat" / ".hidden.jpg")
    _save(tmp_path / "a_cat" / ".thumbs" / "t.jpg")
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    (tmp_path / "a_cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _save(tmp_path / ".git" / "q.jpg")  # hidden folder: not a class
    assert find_classes(tmp_path) == ["a_cat", "b_dog"]
    samples = scan_image_folder(tmp_path)
    rel = [(str(Path(p).relative_to(tmp_path)), label) for p, label in samples]
    assert rel == [("a_cat/w.TIFF", 0), ("a_cat/z.jpeg", 0), ("b_dog/sub/y.png", 1), ("b_dog/x.JPG", 1)]


def test_missing_root_and_no_class_folders_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'}: dataset folder not found"):
        find_classes(tmp_path / "nope")
    _save(tmp_path / "flat.jpg")
    with pytest.raises(DatasetError, match=f"{tmp_path}: no class folders"):
        scan_image_folder(tmp_path)


def test_empty_class_folder_and_empty_dataset_are_errors(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=f"{tmp_path}: no images found"):
        scan_image_folder(tmp_path)
    _save(tmp_path / "dog" / "d.jpg")
    with pytest.raises(DatasetError, match=f"{tmp_path}: class folder\\(s\\) without images: cat"):
        ImageFolderDataset(tmp_path)


def test_val_classes_must_match_train(tmp_path: Path) -> None:
    for c in ("cat", "dog", "fox"):
        _save(tmp_path / "train" / c / "1.png")
    for c in ("cat", "dog", "owl"):
        _save(tmp_path / "val" / c / "1.png")
    train = ImageFolderDataset(tmp_path / "train")
    with pytest.raises(DatasetError, match=r"val: .*missing: \['fox'\]; extra: \['owl'\]"):
        ImageFolderDataset(tmp_path / "val", class_names=train.class_names)
    (tmp_path / "val" / "owl").rename(tmp_path / "val" / "fox")
    val = ImageFolderDataset(tmp_path / "val", class_names=train.class_names)
    assert val.targets == [0, 1, 2] and val.class_names == ["cat", "dog", "fox"]


# --- decoding: every kind of file comes out as 8-bit RGB ----------------------------------------

def _one(tmp_path: Path, name: str, img: Image.Image, **save_args) -> tuple[str, Image.Image]:
    """Saves one image as the whole dataset; returns the mode it is stored in and what comes out."""
    path = _save(tmp_path / "c" / name, img, **save_args)
    out, label = ImageFolderDataset(tmp_path)[0]
    assert label == 0 and out.mode == "RGB"
    with Image.open(path) as stored:
        return f"{stored.mode}/{getattr(stored, 'n_frames', 1)}", out


def test_grayscale_jpeg(tmp_path: Path) -> None:
    stored, out = _one(tmp_path, "g.jpg", Image.new("L", (20, 10), 90))
    assert stored == "L/1"
    assert np.abs(np.asarray(out, np.int16) - 90).max() <= 2


def test_palette_png(tmp_path: Path) -> None:
    img = Image.new("P", (20, 10), 1)
    img.putpalette([0, 0, 0, 200, 30, 60])
    stored, out = _one(tmp_path, "p.png", img)
    assert stored == "P/1"
    assert tuple(np.asarray(out)[5, 5]) == (200, 30, 60)


def test_rgba_png_is_flattened_onto_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    img.paste((0, 0, 255, 0), (10, 0, 20, 10))  # right half fully transparent
    stored, out = _one(tmp_path, "a.png", img)
    assert stored == "RGBA/1"
    assert tuple(np.asarray(out)[5, 2]) == (255, 0, 0) and tuple(np.asarray(out)[5, 15]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    stored, out = _one(tmp_path, "k.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    assert stored == "CMYK/1"
    r, g, b = np.asarray(out, np.int16)[8, 8]
    assert r > 230 and g < 25 and b < 25  # red


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 32 * 16).reshape(16, 32).astype(np.uint16)
    stored, out = _one(tmp_path, "deep.png", Image.fromarray(ramp))
    assert stored in ("I;16/1", "I/1")
    arr = np.asarray(out)
    assert arr.min() == 0 and arr.max() == 255 and 110 < arr.mean() < 145  # a ramp, not all 255
    assert (arr[..., 0] == arr[..., 2]).all()  # still gray


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    _, out = _one(tmp_path, "rot.jpg", img, exif=exif, quality=95)
    assert out.size == (20, 40)
    assert np.asarray(out)[3, 16, 0] > 200 and np.asarray(out)[3, 3, 0] < 50  # red moved to top-right


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    stored, out = _one(tmp_path, "anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=50)
    assert stored == "P/3"
    assert tuple(np.asarray(out)[6, 6]) == (255, 0, 0)


# --- unreadable files are skipped, warned about once and counted --------------------------------

@pytest.fixture
def with_bad_files(tmp_path: Path) -> tuple[Path, list[str]]:
    _save(tmp_path / "a" / "0_good.png")
    bad = [str(_corrupt(tmp_path / "a" / "1_corrupt.jpg")), str(_truncated(tmp_path / "a" / "2_truncated.jpg"))]
    _save(tmp_path / "b" / "3_good.png", Image.new("RGB", (30, 20), (250, 250, 0)))
    return tmp_path, bad


def test_bad_files_are_replaced_warned_once_and_counted(with_bad_files: tuple[Path, list[str]]) -> None:
    root, bad = with_bad_files
    ds = ImageFolderDataset(root)
    assert len(ds) == 4 and ds.num_skipped == 0
    with pytest.warns(SkippedImageWarning) as caught:
        img, label = ds[1]  # corrupt -> truncated -> the next readable one, in class b
    assert label == 1 and img.size == (30, 20)
    messages = [str(w.message) for w in caught if w.category is SkippedImageWarning]
    assert len(messages) == 2
    assert messages[0] == f"skipping unreadable image {bad[0]}: not a recognised image format"
    assert messages[1].startswith(f"skipping unreadable image {bad[1]}: corrupt or truncated")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second pass over the same files warns no more
        assert ds[2][1] == 1 and ds[1][1] == 1 and ds[0][1] == 0
    assert ds.num_skipped == 2 and ds.skipped_files == bad
    copied = copy.deepcopy(ds)  # plain pickling works too; the copy gets its own counter
    assert copied.skipped_files == bad and copied._bad is not ds._bad


def test_skips_in_loader_workers_are_counted_in_the_main_process(with_bad_files: tuple[Path, list[str]]) -> None:
    root, bad = with_bad_files
    ds = ImageFolderDataset(root, transform=Preprocessing(16).to_uint8)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    for _ in range(2):  # two epochs, fresh workers each time: each bad file still counts once
        labels = [int(y) for _, y in loader]
        assert labels == [0, 1, 1, 1]
    assert ds.num_skipped == 2 and ds.skipped_files == bad


def test_all_unreadable_is_a_clear_error(tmp_path: Path) -> None:
    _corrupt(tmp_path / "a" / "x.jpg")
    _corrupt(tmp_path / "b" / "y.png")
    ds = ImageFolderDataset(tmp_path)
    with pytest.warns(SkippedImageWarning), pytest.raises(DatasetError, match="no readable image.*vit-data verify"):
        ds[0]
    with pytest.raises(IndexError):
        ds[2]


# --- verify_dataset and the vit-data CLI ---------------------------------------------------------

def test_verify_reports_counts_unreadable_files_and_class_mismatch(tmp_path: Path) -> None:
    _save(tmp_path / "train" / "cat" / "1.png")
    _save(tmp_path / "train" / "dog" / "1.png")
    _save(tmp_path / "train" / "dog" / "2.png")
    _save(tmp_path / "val" / "cat" / "1.png")
    bad = _truncated(tmp_path / "val" / "cat" / "2.jpg")
    _save(tmp_path / "val" / "eel" / "1.png")
    report = verify_dataset(tmp_path)
    assert [(s.name, s.class_counts) for s in report.splits] == [
        ("train", {"cat": 1, "dog": 2}), ("val", {"cat": 2, "eel": 1})]
    assert [p for p, _ in report.unreadable] == [str(bad)] and "truncated" in report.unreadable[0][1]
    assert len(report.problems) == 1 and "missing: ['dog']; extra: ['eel']" in report.problems[0]
    assert not report.ok
    single = verify_dataset(tmp_path / "train")  # no split folders: the root is the one split
    assert single.ok and [(s.name, s.num_images) for s in single.splits] == [("", 3)]


def _vit_data(*args: str) -> subprocess.CompletedProcess:
    from tests.conftest import run_cli_in_process

    return run_cli_in_process("vit-data", *args)


def test_cli_demo_then_verify_exit_codes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = _vit_data("demo", "--out", str(out), "--seed", "3", "--train-per-class", "2", "--val-per-class", "1")
    assert run.returncode == 0, run.stderr
    assert str(out) in run.stdout and "train: 12 images" in run.stdout and "val: 6 images" in run.stdout

    run = _vit_data("verify", str(out))
    assert run.returncode == 0, run.stderr
    assert "circle" in run.stdout and "OK: all 18 images are readable" in run.stdout

    bad = _corrupt(out / "val" / "square" / "broken.jpg")
    run = _vit_data("verify", str(out))
    assert run.returncode == 1
    assert f"{bad}: not a recognised image format" in run.stdout and "FAILED" in run.stdout

    run = _vit_data("verify", str(tmp_path / "missing"))
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"vit-data: error: {tmp_path / 'missing'}: dataset folder not found\n"


def test_cli_empty_dataset_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"vit-data: error: {tmp_path / 'train'}: no images found")
