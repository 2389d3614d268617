"""A procedurally drawn demo dataset, so training can be tried offline in a few minutes.

Six classes a tiny ViT at 64 px separates well: three filled shapes (circle, square, triangle),
a cross, and two textures (horizontal stripes, checkerboard). Every image varies in size and aspect,
background (flat or gradient), colours, shape size, position, a small tilt and noise, so the model must
learn the shape and not a colour or a pixel position.

Each image draws from its own numpy Generator seeded by (seed, split, class, index): the same seed
gives byte-identical files, and changing the count of one split or class leaves the others as they
were.

`boxes.json` beside the splits records where each image's shape is: {"val/circle/00000.jpg":
[left, top, right, bottom], ...} in pixels (the tight box of the drawn shape; the whole image for
the textures), so attention maps can be scored (the pointing game in tests/test_explain_pointing.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_CLASSES = ("circle", "square", "triangle", "cross", "stripes", "checkerboard")
DEFAULT_TRAIN_PER_CLASS = 200
DEFAULT_VAL_PER_CLASS = 50
MIN_SIDE, MAX_SIDE = 48, 160
_SUPERSAMPLE = 4  # shapes are drawn at 4x and scaled down, for anti-aliased edges
_SPLIT_IDS = {"train": 0, "val": 1}
_JPEG_QUALITY = 92
BOXES_FILE = "boxes.json"
Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive


def generate_demo_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
    val_per_class: int = DEFAULT_VAL_PER_CLASS,
    classes: tuple[str, ...] | list[str] = DEFAULT_CLASSES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Writes out_dir/{train,val}/<class>/NNNNN.jpg and out_dir/boxes.json; returns {split: {class: count}}
    with the classes sorted (label order). `progress(line)` is called as each class is written."""
    unknown = [c for c in classes if c not in DEFAULT_CLASSES]
    if unknown:
        raise ValueError(f"unknown demo classes {unknown}; choose from {list(DEFAULT_CLASSES)}")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("train_per_class and val_per_class must be at least 1")
    out = Path(out_dir)
    summary: dict[str, dict[str, int]] = {}
    boxes: dict[str, Box] = {}
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        summary[split] = {}
        for class_name in classes:
            # The class's index in DEFAULT_CLASSES, not in `classes`, seeds it: a subset of the
            # classes draws the same images as the full set.
            class_id = DEFAULT_CLASSES.index(class_name)
            folder = out / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, _SPLIT_IDS[split], class_id, i])
                image, box = draw_image_with_box(class_name, rng)
                image.save(folder / f"{i:05d}.jpg", quality=_JPEG_QUALITY)
                boxes[f"{split}/{class_name}/{i:05d}.jpg"] = box
            summary[split][class_name] = count
            if progress:
                progress(f"  {split}/{class_name}: {count} images")
        # Listed in label order (the sorted folder names the model's classes are), not drawn order.
        summary[split] = dict(sorted(summary[split].items()))
    _write_readme(out, seed, summary)
    (out / BOXES_FILE).write_text(json.dumps(boxes, indent=0, sort_keys=True))
    return summary


PROBE_SPLIT = "probe"
_PROBE_SPLIT_ID = 2


def generate_pointing_probe(out_dir: str | Path, *, seed: int = 0, per_class: int = 20,
                            classes: tuple[str, ...] = ("circle", "square", "triangle", "cross")) -> int:
    """Writes out_dir/probe/<class>/NNNNN.jpg, off-centre shapes (see draw_image_with_box), and adds
    their boxes to out_dir/boxes.json; returns the number of images."""
    out = Path(out_dir)
    boxes_file = out / BOXES_FILE
    boxes = json.loads(boxes_file.read_text()) if boxes_file.is_file() else {}
    for class_name in classes:
        if class_name in _TEXTURES:
            raise ValueError(f"{class_name!r} is a texture: it has no place to point at")
        folder = out / PROBE_SPLIT / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, _PROBE_SPLIT_ID, DEFAULT_CLASSES.index(class_name), i])
            image, box = draw_image_with_box(class_name, rng, off_centre=True)
            image.save(folder / f"{i:05d}.jpg", quality=_JPEG_QUALITY)
            boxes[f"{PROBE_SPLIT}/{class_name}/{i:05d}.jpg"] = box
    boxes_file.write_text(json.dumps(boxes, indent=0, sort_keys=True))
    return per_class * len(classes)


def read_boxes(root: str | Path) -> dict[str, Box]:
    """{"<split>/<class>/<file>": (left, top, right, bottom)} from a generated dataset's boxes.json."""
    return {k: tuple(v) for k, v in json.loads((Path(root) / BOXES_FILE).read_text()).items()}


def draw_image(class_name: str, rng: np.random.Generator) -> Image.Image:
    """One RGB image of `class_name`, every random choice taken from `rng`."""
    return draw_image_with_box(class_name, rng)[0]


def draw_image_with_box(class_name: str, rng: np.random.Generator,
                        off_centre: bool = False) -> tuple[Image.Image, Box]:
    """`draw_image`, and the shape's box: the pixels at least half covered (textures: the image).

    `off_centre`: a square image with a smaller shape (a third of the side) in one of its four
    quadrants, never over the centre: the pointing game's probe images, where guessing the
    centre fails (in the training images the shape always covers the centre).
    """
    w, h = _image_size(rng)
    if off_centre:
        w = h = max(w, h)
    fg, bg = _contrasting_colours(rng)
    box: Box = (0, 0, w, h)
    if class_name in _TEXTURES:
        arr = _TEXTURES[class_name](rng, w, h, fg, bg)
    else:
        arr = _background(rng, w, h, bg)
        mask = _shape_mask(class_name, rng, w, h, off_centre)  # (h, w) in [0, 1]
        arr = arr * (1.0 - mask[..., None]) + np.asarray(fg, np.float32) * mask[..., None]
        ys, xs = np.nonzero(mask >= 0.5)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    arr = arr + rng.normal(0.0, rng.uniform(0.0, 12.0), size=arr.shape)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB"), box


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    # Sides in [48, 160], aspect at most 2:1 so the eval centre crop still sees the whole shape.
    while True:
        w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
        if max(w, h) <= 2 * min(w, h):
            return w, h


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Redraw until the two colours differ enough in brightness for the shape to be visible.
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
        luma = np.array([0.299, 0.587, 0.114], np.float32)
        if abs(float(fg @ luma - bg @ luma)) >= 70:
            return fg, bg


def _background(rng: np.random.Generator, w: int, h: int, bg: np.ndarray) -> np.ndarray:
    """(h, w, 3) float: flat `bg`, or half the time a linear gradient from `bg` to a nearby colour."""
    arr = np.broadcast_to(bg, (h, w, 3)).astype(np.float32)
    if rng.random() < 0.5:
        other = np.clip(bg + rng.uniform(-50, 50, size=3), 0, 255)
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xs / w * math.cos(angle) + ys / h * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)  # (h, w) in [0, 1]
        arr = arr * (1 - t[..., None]) + other * t[..., None]
    return arr


def _shape_mask(class_name: str, rng: np.random.Generator, w: int, h: int, off_centre: bool = False) -> np.ndarray:
    """(h, w) float coverage in [0, 1] of one shape inside the image's central square (or, when
    `off_centre`, inside one quadrant of a square image)."""
    short = min(w, h)
    if off_centre:
        size = rng.uniform(0.3, 0.4) * short
        # A quadrant, then a place in it that keeps the shape clear of the centre lines.
        qx, qy = rng.integers(0, 2, size=2)
        lo, hi = size / 2 + 1, short / 2 - size / 2 - 1
        cx = qx * short / 2 + (rng.uniform(lo, hi) if qx == 0 else rng.uniform(size / 2 + 1, hi))
        cy = qy * short / 2 + (rng.uniform(lo, hi) if qy == 0 else rng.uniform(size / 2 + 1, hi))
    else:
        size = rng.uniform(0.55, 0.8) * short  # circumscribed diameter
        # Jitter the centre, keeping the shape inside the central short x short square.
        slack = max(0.0, (short - size) / 2 - 1)
        cx = w / 2 + rng.uniform(-slack, slack)
        cy = h / 2 + rng.uniform(-slack, slack)
    # Tilt at most 15 degrees from upright: a free rotation turns squares into diamonds and
    # crosses into Xs, and a tiny ViT then needs far more data to tell the shapes apart.
    tilt = math.radians(rng.uniform(-15, 15))
    s = _SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    r = size / 2 * s
    x0, y0 = cx * s, cy * s
    if class_name == "circle":
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=255)
    elif class_name == "square":
        draw.polygon(_regular_polygon(x0, y0, r, 4, math.pi / 4 + tilt), fill=255)
    elif class_name == "triangle":
        draw.polygon(_regular_polygon(x0, y0, r, 3, -math.pi / 2 + tilt), fill=255)  # apex up
    elif class_name == "cross":
        arm = r * rng.uniform(0.18, 0.3)  # half the bar width: thin enough not to look square
        for bar in ((-r, -arm, r, arm), (-arm, -r, arm, r)):  # horizontal, then vertical bar
            corners = [(bar[0], bar[1]), (bar[2], bar[1]), (bar[2], bar[3]), (bar[0], bar[3])]
            draw.polygon(_rotate(corners, x0, y0, tilt), fill=255)
    else:
        raise ValueError(f"no shape drawer for {class_name!r}")
    small = canvas.resize((w, h), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def _regular_polygon(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    """n vertices on the circle of radius r, the first at `angle` (radians, y pointing down)."""
    step = 2 * math.pi / n
    return [(cx + r * math.cos(angle + k * step), cy + r * math.sin(angle + k * step)) for k in range(n)]


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _stripes(rng: np.random.Generator, w: int, h: int, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    # Horizontal stripes, tilted at most 12 degrees so they never look like a checkerboard.
    # 3-8 light/dark pairs across the short side: stripes stay >= 4 px wide at 64 px (no moire).
    stripe = min(w, h) / rng.uniform(6, 16)
    tilt = rng.uniform(-12, 12) * math.pi / 180
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    v = (ys * math.cos(tilt) + xs * math.sin(tilt)) / stripe + rng.uniform(0, 1)
    on = (np.floor(v) % 2).astype(np.float32)[..., None]  # (h, w, 1)
    return on * fg + (1 - on) * bg


def _checkerboard(rng: np.random.Generator, w: int, h: int, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    cell = min(w, h) / rng.uniform(6, 16)  # cells as wide as the stripes
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ox, oy = rng.uniform(0, 2 * cell, size=2)
    on = ((np.floor((xs + ox) / cell) + np.floor((ys + oy) / cell)) % 2).astype(np.float32)[..., None]
    return on * fg + (1 - on) * bg


_TEXTURES = {"stripes": _stripes, "checkerboard": _checkerboard}


def _write_readme(out: Path, seed: int, summary: dict[str, dict[str, int]]) -> None:
    lines = [
        "Procedural demo dataset written by `vit-data demo` (training/demo_data.py).",
        f"seed: {seed}",
        f"classes: {', '.join(next(iter(summary.values())))}",
    ]
    lines += [f"{split}: {sum(counts.values())} images ({next(iter(counts.values()))} per class)"
              for split, counts in summary.items()]
    (out / "README.txt").write_text("\n".join(lines) + "\n")


__all__ = ["generate_demo_dataset", "generate_pointing_probe", "draw_image", "draw_image_with_box", "read_boxes", "DEFAULT_CLASSES", "BOXES_FILE"]
