"""Does the temperature vit-export fitted hold on images it was not fitted on?

    python bench/calibration.py MODEL_DIR HELD_OUT_DIR [--limit N]

MODEL_DIR is an exported model folder (`vit-export --dir`) whose vit_artifact.json holds
"calibration"; HELD_OUT_DIR holds class folders of labelled images that were NOT among those T was
fitted on (the record's "source"). Prints, on the held-out images, NLL, ECE (15 bins) and top-1 of
the plain softmax and of softmax(logits / T), fp32 torch (and int8 on onnxruntime where the model
has model.int8.onnx), and whether top-1 is identical image by image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vit_service.artifact import load_model  # noqa: E402
from vit_service.calibration import ece, nll, softmax  # noqa: E402
from vit_service.host import host_line  # noqa: E402
from vit_service.quantize import evaluation_images, image_logits, int8_logits  # noqa: E402


def figures(logits: np.ndarray, labels: np.ndarray, t: float) -> dict[str, float]:
    before, after = softmax(logits), softmax(logits, t)
    return {"nll_before": nll(logits, labels), "nll_after": nll(logits, labels, t),
            "ece_before": ece(before, labels), "ece_after": ece(after, labels),
            "top1_before": float((before.argmax(1) == labels).mean()), "top1_after": float((after.argmax(1) == labels).mean()),
            "top1_identical": bool((before.argmax(1) == after.argmax(1)).all())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("held_out")
    p.add_argument("--limit", type=int, default=0, help="at most N held-out images, every class in turn (0: all)")
    args = p.parse_args()
    model, artifact = load_model(args.model_dir)
    if not artifact.calibration:
        sys.exit(f"{args.model_dir}: no calibration in its vit_artifact.json (export it again with vit-export)")
    c = artifact.calibration
    if Path(args.held_out).resolve() == Path(c["source"]).resolve():
        sys.exit(f"{args.held_out} is the folder T was fitted on: give held-out images")
    images = evaluation_images(args.held_out, artifact.class_names, limit=args.limit or None)
    images = [(path, label) for path, label in images if label is not None]
    print(host_line())
    print(f"T = {c['temperature']:.4f}, fitted on {c['images']} images of {c['source']} "
          f"(there: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}, NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f})")
    runs = {"fp32": lambda: image_logits(model.eval(), artifact.preprocessing, images)}
    int8_file = Path(args.model_dir) / (artifact.int8 or {}).get("file", "-")
    if artifact.int8 and int8_file.is_file():
        runs["int8"] = lambda: int8_logits(int8_file, artifact.preprocessing, images)
    print(f"held out: {len(images)} images of {args.held_out}")
    print("| model | NLL before -> after | ECE before -> after | after / before | top-1 before, after | top-1 identical |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        logits, labels = run()
        f = figures(logits, labels, c["temperature"])
        print(f"| {name} | {f['nll_before']:.4f} -> {f['nll_after']:.4f} | {f['ece_before']:.4f} -> {f['ece_after']:.4f} "
              f"| {f['ece_after'] / max(f['ece_before'], 1e-12):.2f} | {f['top1_before']:.4f}, {f['top1_after']:.4f} "
              f"| {'yes' if f['top1_identical'] else 'NO'} |")


if __name__ == "__main__":
    main()
