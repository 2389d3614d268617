"""`vit-explain`: attention maps for image files, written as overlay PNGs and raw patch grids.

    vit-explain IMAGE|FOLDER... --model RUN|CKPT|DIR|HUB_NAME|TAG [--method rollout|grad] [--class LABEL] --out DIR

Per image, OUT/<name>.png (the image, the heatmap over the crop the model saw, the explained label
and score: the top class, or --class) and OUT/<name>.json (the patch grid, rows x cols floats in [0, 1], and the top-k
predictions), plus OUT/<name>.npy (the grid as a float32 array). A FOLDER stands for every image
under it (recursively, in name order), as `vit-train predict` reads one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vit_service.explain import HEAD_FUSIONS, METHODS, Explainer
from vit_service.formats.sources import FORMATS, ModelFormat, ModelSourceError, load_model_source
from vit_service.backends.torch_runtime import resolve_device
from vit_service.predictions import top_k_predictions
from vit_service.overlay import render_overlay
from vit_service.preprocessing import IMAGE_EXTENSIONS, InvalidImageError, list_images, open_image

PROG = "vit-explain"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...) or folders of them")
    p.add_argument("--model", required=True,
                   help="a vit-train run folder (its best checkpoint) or .ckpt, an exported or transformers model "
                        "folder, a timm hub name, or a BentoML tag (e.g. vit-classifier:latest)")
    p.add_argument("--method", choices=METHODS, default="rollout",
                   help="rollout: attention rollout (class-agnostic); grad: gradient-weighted (Chefer et al. 2021)")
    p.add_argument("--class", dest="label", help="explain this class (name or index) instead of the top one")
    p.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean", help="rollout: fuse heads by (default mean)")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this share of weakest attention links")
    p.add_argument("--top-k", type=int, default=5, help="predictions listed in the JSON (default 5)")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    return p


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _output_stems(paths: list[Path]) -> list[str]:
    """File stems, made unique (a.jpg and a.png, or dir1/a.jpg and dir2/a.jpg)."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        stems.append(p.stem if n == 0 else f"{p.stem}-{n}")
    return stems


def main(argv: list[str] | None = None, formats: Sequence[ModelFormat] = FORMATS) -> int:
    """vit-explain on `argv`, loading --model from the first of `formats` that matches (the
    `vit-explain` command passes training's list, which puts vit-train run folders first)."""
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.discard_ratio < 1.0:
        return _error(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    # Read every image first: a bad file stops the run before anything is written.
    paths = []
    for given in map(Path, args.images):
        found = [Path(p) for p in list_images(given)] if given.is_dir() else [given]
        if not found:
            return _error(f"{given}: a folder with no image files in it (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        paths += found
    try:
        images = [open_image(p) for p in paths]
    except InvalidImageError as e:
        return _error(str(e))
    try:
        model, artifact = load_model_source(args.model, resolve_device(args.device), formats=formats)
    except (ModelSourceError, ValueError) as e:
        return _error(str(e))
    explainer = Explainer(model, artifact, model.pos_embed.device)
    label = int(args.label) if args.label is not None and args.label.isdigit() else args.label
    try:
        class_index = explainer.class_index(label)
    except ValueError as e:
        return _error(f"--class: {e}")
    top_k = max(1, min(args.top_k, len(explainer.class_names)))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, stem, image in zip(paths, _output_stems(paths), images):
        ex = explainer.explain_image(image, args.method, class_index, args.head_fusion, args.discard_ratio)
        explained = explainer.class_names[ex.class_index]
        predictions = top_k_predictions(ex.probs, explainer.class_names, top_k)
        caption = f"{explained} {ex.probs[ex.class_index]:.2f} ({args.method})"
        render_overlay(image, ex.grid, ex.crop_box, caption).save(out / f"{stem}.png")
        np.save(out / f"{stem}.npy", ex.grid)
        record = {
            "image": str(path), "method": args.method, "explained_class": explained,
            "head_fusion": args.head_fusion if args.method == "rollout" else None,
            "discard_ratio": args.discard_ratio if args.method == "rollout" else None,
            "predictions": predictions, "grid_shape": list(ex.grid.shape),
            "grid": np.round(ex.grid, 5).tolist(), "crop_box": [round(v, 2) for v in ex.crop_box],
        }
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
        # The class the map explains (the top one unless --class), as in the PNG's caption; the
        # top prediction is named too when it is another class.
        top = predictions[0]
        also = f" (top: {top['label']} {top['score']:.3f})" if top["label"] != explained else ""
        print(f"{path}: {explained} {float(ex.probs[ex.class_index]):.3f}{also} -> {out / stem}.png")
    return 0


def entry() -> None:
    """Without vit-train run folders (this package never reads Lightning's layout); the installed
    `vit-explain` is training/explain_cli.py's, which adds them."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
