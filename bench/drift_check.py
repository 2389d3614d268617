"""Prediction drift through a real server: the drift gauges on an in-distribution stream, then a
shifted one, and what the bookkeeping costs a request.

    serve     `bentoml serve` of --model-tag (a model exported with its validation reference), two
              streams of --count images each posted to /classify_batch in order: --in-dist (a
              folder, e.g. CIFAR-10's test/ class folders: images the model's validation reference
              describes), then --shifted (a folder), or the in-distribution images transformed
              (`--shift blur`, `noise` or `two-classes`: only the first two class folders). After
              each stream, /metrics' drift gauges. VIT_DRIFT_WINDOW is --window, so each
              worker's window holds only the stream it was last fed.
    overhead  the per-request cost of the bookkeeping (DriftWindow.observe + the gauges), in
              this process, for a batch of one over --classes classes, beside a p50 you give.

    python bench/drift_check.py serve --model-tag cifar10:latest --in-dist DATA/test --shift two-classes
    python bench/drift_check.py overhead --classes 10 1000 --p50-ms 45
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.local_server, whether run as a script or imported

from bench.local_server import local_server  # noqa: E402
from vit_service.host import host_line  # noqa: E402
from vit_service.preprocessing import list_images  # noqa: E402

GAUGES = ("vit_drift_window_predictions", "vit_drift_class_psi", "vit_drift_top1_score_psi",
          "vit_drift_top1_score_mean", "vit_drift_low_confidence_ratio")


def stream(folder: Path, count: int, shift: str | None, seed: int = 0) -> list[tuple[str, bytes]]:
    """`count` images from `folder`, drawn evenly across it (seeded), optionally shifted."""
    paths = list_images(folder)
    if shift == "two-classes":
        classes = sorted({Path(p).parent.name for p in paths})[:2]
        paths = [p for p in paths if Path(p).parent.name in classes]
    chosen = np.random.default_rng(seed).choice(len(paths), size=min(count, len(paths)), replace=False)
    out = []
    for i in sorted(chosen):
        data = Path(paths[i]).read_bytes()
        if shift in ("blur", "noise"):
            image = Image.open(io.BytesIO(data)).convert("RGB")
            if shift == "blur":
                image = image.filter(ImageFilter.GaussianBlur(radius=max(2, image.width // 8)))
            else:
                pixels = np.asarray(image, np.float32) + np.random.default_rng(int(i)).normal(0, 80, (image.height, image.width, 3))
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
        out.append((Path(paths[i]).name, data))
    return out


def gauges(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = {}
    for name in GAUGES:
        values = [float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)]
        if values:
            found[name] = values[-1]
    return found


def post_all(url: str, images: list[tuple[str, bytes]], batch: int = 16) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(0, len(images), batch):
            files = [("images", (name, data, "image/jpeg")) for name, data in images[i:i + batch]]
            r = client.post("/classify_batch", files=files)
            r.raise_for_status()


def serve(args: argparse.Namespace) -> None:
    shifted_from = args.shifted or args.in_dist
    streams = {"in-distribution": stream(args.in_dist, args.count, None),
               f"shifted ({args.shift or args.shifted})": stream(shifted_from, args.count, args.shift, seed=1)}
    env = {"VIT_MODEL_TAG": args.model_tag, "VIT_DRIFT_WINDOW": str(args.window)}
    with tempfile.TemporaryDirectory() as tmp, local_server(Path(tmp) / "serve.log", env) as url:
        print(f"| stream | images | {' | '.join(g.removeprefix('vit_drift_') for g in GAUGES)} |")
        print(f"|---|---:|{'---:|' * len(GAUGES)}")
        for name, images in streams.items():
            start = time.perf_counter()
            post_all(url, images)
            seen = gauges(url)
            row = " | ".join(f"{seen[g]:.3f}" if g in seen else "(none)" for g in GAUGES)
            print(f"| {name} | {len(images)} | {row} |   ({time.perf_counter() - start:.0f} s)", flush=True)


def overhead(args: argparse.Namespace) -> None:
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from vit_service.serving import metrics
    from vit_service.serving.drift import DriftWindow

    for k in args.classes:
        ref = {"images": 1, "class_shares": [1 / k] * k, "score_edges": [0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0],
               "score_shares": [1 / 6] * 6, "mean_top1": 0.5, "low_confidence": 0.5, "low_confidence_share": 0.5}
        window = DriftWindow(ref, size=1000)
        probs = np.random.default_rng(0).dirichlet(np.ones(k), size=(args.calls, 1)).astype(np.float32)  # (N, 1, K)
        for p in probs[:1000]:  # fill the window: every call from here on also evicts one
            window.observe(p)
        start = time.perf_counter()
        for p in probs:
            window.observe(p)
            metrics.observe_drift("bench", window.count, window.gauges())
        per_call_us = (time.perf_counter() - start) / len(probs) * 1e6
        share = f", {per_call_us / (args.p50_ms * 1000) * 100:.3f}% of a {args.p50_ms} ms p50" if args.p50_ms else ""
        print(f"{k} classes: {per_call_us:.1f} us per request (observe + gauges, window full){share}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--model-tag", required=True)
    s.add_argument("--in-dist", type=Path, required=True)
    s.add_argument("--shifted", type=Path, default=None)
    s.add_argument("--shift", choices=("blur", "noise", "two-classes"), default=None)
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--window", type=int, default=500)
    o = sub.add_parser("overhead")
    o.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    o.add_argument("--calls", type=int, default=20000)
    o.add_argument("--p50-ms", type=float, default=None)
    args = p.parse_args()
    if args.command == "serve" and not (args.shifted or args.shift):
        p.error("serve needs --shifted DIR or --shift")
    print(host_line(), flush=True)
    (serve if args.command == "serve" else overhead)(args)


if __name__ == "__main__":
    main()
