"""The procedural demo dataset: layout, determinism, variety, and that its classes are learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.demo_data import DEFAULT_CLASSES, draw_image, generate_demo_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, generate_demo_dataset(out, seed=0, train_per_class=12, val_per_class=6)


def test_layout_and_counts(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    assert summary == {"train": dict.fromkeys(DEFAULT_CLASSES, 12), "val": dict.fromkeys(DEFAULT_CLASSES, 6)}
    for split, per_class in (("train", 12), ("val", 6)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(DEFAULT_CLASSES)
        for name in DEFAULT_CLASSES:
            files = sorted((out / split / name).iterdir())
            assert len(files) == per_class and all(f.suffix == ".jpg" for f in files)
    assert "seed: 0" in (out / "README.txt").read_text()


def test_same_seed_same_bytes_other_seed_differs(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = demo
    generate_demo_dataset(tmp_path / "again", seed=0, train_per_class=12, val_per_class=6)
    generate_demo_dataset(tmp_path / "seed1", seed=1, train_per_class=12, val_per_class=6)
    first, again, other = _files(out), _files(tmp_path / "again"), _files(tmp_path / "seed1")
    assert len(first) == 6 * 18 and first == again
    assert first.keys() == other.keys()
    assert sum(first[k] != other[k] for k in first) == len(first)  # every image changes with the seed
    assert len(set(first.values())) == len(first)  # and no two images of one seed are equal


def test_images_are_independent_of_counts_and_class_subset(demo: tuple[Path, dict], tmp_path: Path) -> None:
    # Each image has its own Generator: fewer images or fewer classes leave the rest unchanged.
    out, _ = demo
    generate_demo_dataset(tmp_path, seed=0, train_per_class=3, val_per_class=2, classes=("cross",))
    small = _files(tmp_path)
    assert len(small) == 5
    assert all(small[k] == (out / k).read_bytes() for k in small)


def test_image_sizes_vary(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    sizes = [Image.open(p).size for p in out.rglob("*.jpg")]
    assert all(48 <= s <= 160 for size in sizes for s in size)
    assert all(max(w, h) <= 2 * min(w, h) for w, h in sizes)
    assert len(set(sizes)) > len(sizes) // 2  # mostly distinct sizes
    assert sum(w != h for w, h in sizes) > len(sizes) // 2  # mostly not square
    assert all(Image.open(p).mode == "RGB" for p in out.rglob("*.jpg"))


def _silhouette(path: Path) -> np.ndarray:
    """16x16 map of how far each pixel is from the border colour: the shape, whatever its colours."""
    img = Image.open(path).convert("L")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((16, 16))
    a = np.asarray(img, np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    d = np.abs(a - np.median(border))
    return (d / (d.max() + 1e-6)).ravel()


def test_classes_are_distinguishable(demo: tuple[Path, dict]) -> None:
    # A nearest-class-mean classifier on crude silhouettes, fit on train, must beat chance (1/6)
    # by far on val: a sanity check that the classes differ in shape, not only in name.
    out, _ = demo
    means = np.stack([np.mean([_silhouette(p) for p in sorted((out / "train" / c).iterdir())], axis=0)
                      for c in DEFAULT_CLASSES])
    correct = total = 0
    for label, c in enumerate(DEFAULT_CLASSES):
        for p in sorted((out / "val" / c).iterdir()):
            correct += int(np.argmin(((means - _silhouette(p)) ** 2).sum(axis=1)) == label)
            total += 1
    assert correct / total >= 0.5, f"nearest-mean accuracy {correct}/{total}"


def test_draw_image_and_bad_arguments(tmp_path: Path) -> None:
    img = draw_image("triangle", np.random.default_rng(0))
    assert img.mode == "RGB" and 48 <= min(img.size)
    with pytest.raises(ValueError, match="hexagon"):
        generate_demo_dataset(tmp_path, classes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="at least 1"):
        generate_demo_dataset(tmp_path, val_per_class=0)
