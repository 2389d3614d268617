"""The pointing game on the demo shapes: does an attention map's peak fall on the drawn shape?

The images are the probe set of `training.demo_data.generate_pointing_probe`: circle, square,
triangle and cross drawn off-centre, in one quadrant of a square image (in the demo's own val
images the shape always covers the centre, so a centre guess would nearly always hit there;
bench/README.md, "Attention maps: the pointing game"). The peak patch of the map is a hit when its
centre lies inside the shape's recorded box (`boxes.json`).
Baselines on the same images: a uniformly random patch, the centre patch, and (in the command's
output) the same methods on an untrained model of the same architecture.

    python -m training.pointing_game [--out DIR] [--train-per-class 60] [--epochs 12]

generates demo data and the probe, trains the demo model with `vit-train fit` (exactly what
tests/test_explain_pointing.py does) and prints each method's hit rate beside the baselines (the
figures in bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.demo_data import (BOXES_FILE, DEFAULT_CLASSES, PROBE_SPLIT, generate_demo_dataset,
                                generate_pointing_probe, read_boxes)
from vit_service.explain import Explainer, peak_point
from vit_service.preprocessing import open_image

SHAPE_CLASSES = tuple(c for c in DEFAULT_CLASSES if c not in ("stripes", "checkerboard"))
# (label, method, head fusion, discard ratio): every variant the figures report.
VARIANTS = [
    ("rollout-mean", "rollout", "mean", 0.0),
    ("rollout-max", "rollout", "max", 0.0),
    ("rollout-min", "rollout", "min", 0.0),
    ("rollout-mean-discard0.9", "rollout", "mean", 0.9),
    ("grad", "grad", "mean", 0.0),
]


@dataclass
class PointingScore:
    hits: int
    images: int
    baseline: float  # expected hit rate of a random patch
    box_share: float  # mean share of the image the box covers
    centre_hit_rate: float  # hit rate of always pointing at the centre patch

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.images)


def _inside(point: tuple[float, float], box: tuple[float, ...]) -> bool:
    x, y = point
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def _random_patch_hit_rate(grid_shape: tuple[int, int], crop: tuple[float, ...], box: tuple[float, ...]) -> float:
    gh, gw = grid_shape
    hits = sum(_inside(peak_point(_one_hot(gh, gw, r, c), crop), box) for r in range(gh) for c in range(gw))
    return hits / (gh * gw)


def _one_hot(gh: int, gw: int, r: int, c: int) -> np.ndarray:
    g = np.zeros((gh, gw), np.float32)
    g[r, c] = 1.0
    return g


def pointing_game(explainer: Explainer, data_root: str | Path, split: str = PROBE_SPLIT, method: str = "rollout",
                  head_fusion: str = "mean", discard_ratio: float = 0.0) -> PointingScore:
    """Scores one method on every shape image of `split` under `data_root` (a generated demo set)."""
    root = Path(data_root)
    keys = [k for k in sorted(read_boxes(root)) if k.split("/")[0] == split and k.split("/")[1] in SHAPE_CLASSES]
    if not keys:
        raise ValueError(f"{root}: no {split} images of the shape classes in {BOXES_FILE}")
    boxes = read_boxes(root)
    images = [open_image(root / k) for k in keys]
    pre = explainer.preprocessing
    pixels = np.stack([pre.to_uint8(img).numpy() for img in images])  # (B, 3, S, S) uint8
    _, _, grids = explainer.explain_uint8(pixels, method, None, head_fusion, discard_ratio)  # one batch
    hits, centre_hits, baselines, shares = 0, 0, [], []
    for key, image, grid in zip(keys, images, grids):
        box, crop = boxes[key], pre.crop_box(*image.size)
        hits += _inside(peak_point(grid, crop), box)
        gh, gw = grid.shape
        centre_hits += _inside(peak_point(_one_hot(gh, gw, gh // 2, gw // 2), crop), box)
        baselines.append(_random_patch_hit_rate(grid.shape, crop, box))
        w, h = image.size
        shares.append((box[2] - box[0]) * (box[3] - box[1]) / (w * h))
    return PointingScore(hits, len(keys), float(np.mean(baselines)), float(np.mean(shares)), centre_hits / len(keys))


def train_demo_model(workdir: Path, train_per_class: int, val_per_class: int, epochs: int,
                     probe_per_class: int = 10, seed: int = 0) -> tuple[Path, Path]:
    """Generates demo data and the probe set, and trains configs/demo.yaml on it with
    `vit-train fit`, all under `workdir`; returns (data root, last checkpoint)."""
    import yaml

    data = workdir / "data"
    generate_demo_dataset(data, seed=seed, train_per_class=train_per_class, val_per_class=val_per_class)
    generate_pointing_probe(data, seed=seed, per_class=probe_per_class)
    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "configs/demo.yaml").read_text())
    run = workdir / "run"
    cfg["trainer"].update(max_epochs=epochs, default_root_dir=str(run), enable_progress_bar=False)
    cfg["data"].update(train_dir=str(data / "train"), val_dir=str(data / "val"), num_workers=0)
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [str(Path(sys.executable).parent / "vit-train"), "fit", "--config", str(config)]
    result = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"vit-train fit failed:\n{result.stderr[-4000:]}")
    return data, run / "version_0" / "checkpoints" / "last.ckpt"  # the first run under default_root_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="work folder (default: a temporary one)")
    p.add_argument("--train-per-class", type=int, default=60)
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--probe-per-class", type=int, default=25)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    import torch

    from vit_service.formats.sources import load_model_source
    from vit_service.model import VisionTransformer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, ckpt = train_demo_model(work, args.train_per_class, args.val_per_class, args.epochs,
                                      args.probe_per_class)
        trained = Explainer(*load_model_source(str(ckpt)))
        torch.manual_seed(0)  # the control: the same architecture, untrained
        untrained = Explainer(VisionTransformer(trained.model.config).eval(), trained.artifact)
        figures = {}
        print(f"{'method':<26} {'trained':>8} {'untrained':>10} {'random patch':>13} {'centre patch':>13} images")
        for label, method, fusion, discard in VARIANTS:
            s = pointing_game(trained, data, PROBE_SPLIT, method, fusion, discard)
            u = pointing_game(untrained, data, PROBE_SPLIT, method, fusion, discard)
            figures[label] = {"hit_rate": round(s.hit_rate, 4), "untrained_hit_rate": round(u.hit_rate, 4),
                              "random_patch": round(s.baseline, 4), "centre_patch": round(s.centre_hit_rate, 4),
                              "box_share": round(s.box_share, 4), "images": s.images}
            print(f"{label:<26} {s.hit_rate:>8.3f} {u.hit_rate:>10.3f} {s.baseline:>13.3f} "
                  f"{s.centre_hit_rate:>13.3f} {s.images}")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
