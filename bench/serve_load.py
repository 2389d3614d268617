"""Serving load: the HTTP service under N concurrent clients, against the raw pipeline in one process.

Setups, measured in one run on the same model and the same JPEGs:
    (a) raw       decode + resize/crop + forward in this process, one thread of calls, at several
                  batch sizes (`vit_service.inference.Predictor`, the code the service runs)
    (b) batched   `bentoml serve vit_service.serving.service:ViTClassifier` with adaptive batching
                  (VIT_MODE from --mode: auto picks inprocess on a CPU-only host)
    (c) unbatched the same server with VIT_BATCHING=0: one forward pass per request
    (d) naive     bench/naive_service.py: one batchable BentoML API on PIL images with per-request
                  torchvision transforms, the baseline to beat
    (e) split     (b) with VIT_MODE=split: front and model service in two processes
For the servers, N async clients POST one JPEG each to /classify, back to back, for a fixed time
per concurrency level. Reported: throughput, p50/p95/p99 latency, errors (any status but 200),
the batch-size distribution (read from the batch-size histogram on /metrics before and after
each level), and for our service the mean of each stage of its Server-Timing header.

The model is a random-init preset saved into a temporary BENTOML_HOME unless `--model-tag` names
one in your store: throughput and latency do not depend on the weights' values.

    python bench/serve_load.py                                   # vit_tiny, 1/16/32 clients, 20 s each, (a)-(d)
    python bench/serve_load.py --duration 5 --clients 1,16       # a quick smoke run
    python bench/serve_load.py --model-tag vit-classifier:latest --json bench/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import re
import signal
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from vit_service.serving.local_server import local_server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The shared dataset folder sits beside the checkout (or beside its worktrees' folder).
CIFAR_TAR = next((p for p in (REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz",
                              REPO.parent.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz") if p.exists()),
                 REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz")
DEFAULT_IMAGES = Path("/tmp/cifar10/test")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_KINDS = {"small": (224, 224), "photo": (500, 375)}  # CIFAR-10 upscaled (bicubic), JPEG q90
SETUP_NAMES = {"raw": "(a) raw", "batched": "(b) service, adaptive batching", "unbatched": "(c) service, batching off",
               "naive": "(d) naive BentoML service", "split": "(e) service, split mode"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_tiny_patch16_224", help="random-init model preset (without --model-tag)")
    p.add_argument("--model-tag", default=None, help="use this model from your BentoML store instead")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs (searched recursively)")
    p.add_argument("--image-kind", default="mix", choices=["small", "photo", "mix"],
                   help="small: 224x224, photo: 500x375, mix: half each")
    p.add_argument("--num-images", type=int, default=200, help="distinct images held in memory, cycled")
    p.add_argument("--clients", default="1,16,32", help="comma-separated concurrency levels")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    p.add_argument("--raw-batch-sizes", default="1,8,16,32")
    p.add_argument("--raw-seconds", type=float, default=None, help="seconds per raw batch size (default: --duration / 2)")
    p.add_argument("--setups", default="raw,batched,unbatched,naive",
                   help="comma-separated subset of raw,batched,unbatched,naive,split")
    p.add_argument("--mode", default="auto", help="VIT_MODE of (b) and (c): auto | inprocess | split")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (VIT_DEVICE)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the raw run and the server (OMP_NUM_THREADS); default: torch's")
    p.add_argument("--max-concurrency", type=int, default=64, help="VIT_MAX_CONCURRENCY of the server")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra server setting, e.g. VIT_MAX_LATENCY_MS=5000 (repeatable)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--log-dir", type=Path, default=None, help="keep the server logs here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.raw_batch_sizes = [int(b) for b in args.raw_batch_sizes.split(",") if b.strip()]
    args.setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if unknown := set(args.setups) - set(SETUP_NAMES):
        p.error(f"unknown setup(s) {sorted(unknown)}")
    if args.raw_seconds is None:
        args.raw_seconds = args.duration / 2
    for kv in args.server_env:
        if "=" not in kv:
            p.error(f"--server-env wants KEY=VALUE, got {kv!r}")
    if max(args.clients) >= args.max_concurrency:
        print(f"note: {max(args.clients)} clients reach --max-concurrency {args.max_concurrency}: expect 429s")
    return args


# ------------------------------------------------------------------------------ machine, images

def machine_info(device: str) -> dict[str, Any]:
    import bentoml
    import torch

    from vit_service.inference import resolve_device

    cpu = platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    dev = resolve_device(device)
    return {
        "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "bentoml": bentoml.__version__, "python": platform.python_version(),
        "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "load_average_1min": {"start": round(os.getloadavg()[0], 2)},  # then at each phase, see main()
    }


def load_images(folder: Path, kind: str, n: int) -> list[tuple[str, bytes]]:
    """n source images, evenly spread over `folder`, upscaled to the kind's size and re-encoded as
    JPEG quality 90: [(name, bytes)], alternating sizes for "mix"."""
    if not folder.is_dir() and folder == DEFAULT_IMAGES:
        print(f"extracting CIFAR-10 test images from {CIFAR_TAR} to {folder.parent.parent}")
        with tarfile.open(CIFAR_TAR) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("cifar10/test/")]
            tar.extractall(folder.parent.parent, members=members, filter="data")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no JPEG files under {folder}")
    picks = [files[i * len(files) // n] for i in range(min(n, len(files)))]
    sizes = [IMAGE_KINDS["small"], IMAGE_KINDS["photo"]] if kind == "mix" else [IMAGE_KINDS[kind]]
    out = []
    for i, path in enumerate(picks):
        size = sizes[i % len(sizes)]
        with Image.open(path) as img:
            big = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=90)
        out.append((f"{path.parent.name}_{path.stem}_{size[0]}x{size[1]}.jpg", buf.getvalue()))
    return out


def prepare_model(args: argparse.Namespace, home: Path) -> tuple[str, Path]:
    """(model tag, model directory). Sets BENTOML_HOME to `home` unless --model-tag is given."""
    if args.model_tag:
        import bentoml

        model = bentoml.models.get(args.model_tag)
        return str(model.tag), Path(model.path)
    os.environ["BENTOML_HOME"] = str(home)  # before bentoml is imported: it reads this once
    import bentoml
    import torch

    from vit_service.artifact import ModelArtifact
    from vit_service.model import ViTConfig, VisionTransformer
    from vit_service.preprocessing import Preprocessing
    from vit_service.serving.store import save_to_bentoml

    torch.manual_seed(0)
    config = ViTConfig.from_preset(args.preset, num_classes=len(CIFAR10_CLASSES))
    model = VisionTransformer(config).eval()
    artifact = ModelArtifact(config=config, class_names=list(CIFAR10_CLASSES),
                             preprocessing=Preprocessing(image_size=config.image_size),
                             metadata={"trained_by": "bench/serve_load.py (random init)"})
    tag = save_to_bentoml("vit-bench", model, artifact).tag
    return str(tag), Path(bentoml.models.get(tag).path)  # its path in the store, not the staging one


# ------------------------------------------------------------------------------ (a) raw pipeline

def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}


def decode_rate_per_core(images: list[tuple[str, bytes]], image_size: int, resize_size: int,
                         seconds: float) -> dict[str, float]:
    """Decode + resize + crop of the 500x375 JPEGs on one thread, per second of that thread's CPU
    time (so other load on the machine does not lower it): the per-core rate of a front's decoding."""
    from vit_service.preprocessing import Preprocessing, decode_image

    pre = Preprocessing(image_size=image_size)
    photos = [d for name, d in images if name.endswith(f"{IMAGE_KINDS['photo'][0]}x{IMAGE_KINDS['photo'][1]}.jpg")]
    if not photos:
        return {}
    n, cpu0 = 0, time.thread_time()
    deadline = time.perf_counter() + seconds
    while n < 20 or time.perf_counter() < deadline:
        pre.to_uint8(decode_image(photos[n % len(photos)], draft_size=resize_size))
        n += 1
    cpu = time.thread_time() - cpu0
    return {"images": n, "cpu_s": cpu, "img_per_cpu_s": n / cpu, "ms_per_img": 1000 * cpu / n}


def run_raw(model_dir: Path, images: list[tuple[str, bytes]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode, preprocess and forward in this process, one batch after another, per batch size.
    Decoding uses the server's settings (JPEG draft mode on, default pixel limit)."""
    from vit_service.inference import Predictor
    from vit_service.preprocessing import decode_image

    predictor = Predictor.from_directory(model_dir, device=args.device)
    pre = predictor.preprocessing
    rate = decode_rate_per_core(images, pre.image_size, pre.resize_size, args.raw_seconds)
    if rate:
        print(f"  decode + resize + crop of a 500x375 JPEG: {rate['ms_per_img']:.2f} ms of CPU, "
              f"{rate['img_per_cpu_s']:.0f} img/s per core")
        args.decode_rate = rate
    predictor.warmup(max(args.raw_batch_sizes))
    results, cursor = [], 0
    for b in args.raw_batch_sizes:
        times: list[float] = []
        deadline = time.perf_counter() + args.raw_seconds
        while len(times) < 4 or (time.perf_counter() < deadline and len(times) < 100_000):
            batch = [images[(cursor + i) % len(images)][1] for i in range(b)]
            cursor += b
            start = time.perf_counter()
            pixels = np.stack([pre.to_uint8(decode_image(d, draft_size=pre.resize_size)).numpy() for d in batch])
            predictor.predict_proba(pixels)  # (B, 3, S, S) uint8 -> (B, K); returns on the CPU, so synced
            times.append(time.perf_counter() - start)
        times = times[1:]  # the first call at a new batch size pays for allocations
        row = {"batch_size": b, "batches": len(times), "img_per_s": b * len(times) / sum(times),
               **percentiles_ms(times)}
        print(f"  raw batch {b:>3}: {row['img_per_s']:7.1f} img/s, p50 {row['p50_ms']:.1f} ms per batch")
        results.append(row)
    return results


# ------------------------------------------------------------------------------ (b), (c) server

_HIST = re.compile(r'^(\w+)_(bucket|count|sum)(?:\{([^}]*)\})? (\S+)', re.MULTILINE)
# Where each server reports its batch sizes: (metric, a label every sample must carry).
BATCH_METRICS = {"ours": [("vit_batch_size", "")],
                 "naive": [("bentoml_service_adaptive_batch_size", 'method_name="classify"')]}


def batch_histogram(metrics_text: str, kind: str = "ours") -> dict[str, float]:
    """The batch-size histogram: {"count", "sum", "le=<bound>" (cumulative)}."""
    out: dict[str, float] = {}
    for name, series, labels, value in _HIST.findall(metrics_text):
        if not any(name == metric and label in labels for metric, label in BATCH_METRICS[kind]):
            continue
        key = series
        if series == "bucket":
            key = "le=" + re.search(r'le="([^"]+)"', labels).group(1)
        out[key] = out.get(key, 0.0) + float(value)
    return out


_TIMING = re.compile(r"(\w+);dur=([\d.]+)")


def histogram_diff(before: dict[str, float], after: dict[str, float]) -> dict[str, Any] | None:
    """Batches, mean batch size and {upper bound: batches} (non-cumulative) between two snapshots."""
    count = after.get("count", 0.0) - before.get("count", 0.0)
    if count <= 0:
        return None
    bounds = sorted((k for k in after if k.startswith("le=")), key=lambda k: float(k[3:]))
    dist, previous = {}, 0.0
    for k in bounds:
        cumulative = after[k] - before.get(k, 0.0)
        if cumulative - previous > 0:
            dist[k[3:]] = int(round(cumulative - previous))
        previous = cumulative
    total = after.get("sum", 0.0) - before.get("sum", 0.0)
    return {"batches": int(round(count)), "mean_batch": total / count, "distribution": dist}


@dataclass
class Sample:
    start: float  # seconds since the level began
    latency: float
    status: int  # 0: no HTTP answer (connection error, client timeout)


async def load_level(url: str, images: list[tuple[str, bytes]], clients: int, warmup: float,
                     duration: float, kind: str = "ours") -> dict[str, Any]:
    """`clients` loops posting to /classify back to back for warmup + duration seconds."""
    samples: list[Sample] = []
    stages: dict[str, list[float]] = {}
    counter = iter(range(10**12))
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        t_begin = time.perf_counter()
        t0, t1 = t_begin + warmup, t_begin + warmup + duration

        async def client() -> None:
            while (start := time.perf_counter()) < t1:
                name, data = images[next(counter) % len(images)]
                try:
                    r = await http.post("/classify", files={"image": (name, data, "image/jpeg")})
                    status = r.status_code
                    if start >= t0 and status == 200:
                        for stage, ms in _TIMING.findall(r.headers.get("server-timing", "")):
                            stages.setdefault(stage, []).append(float(ms))
                except httpx.HTTPError:
                    status = 0
                samples.append(Sample(start - t_begin, time.perf_counter() - start, status))

        async def snapshot_at(t: float) -> dict[str, float]:
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            return batch_histogram((await http.get("/metrics")).text, kind)

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        before = await snapshot_at(t0)
        await asyncio.gather(*tasks)
        after = batch_histogram((await http.get("/metrics")).text, kind)

    measured = [s for s in samples if s.start >= warmup]
    ok_in_window = [s for s in measured if s.status == 200 and s.start + s.latency <= warmup + duration]
    errors: dict[str, int] = {}
    for s in samples:  # warm-up included: an error is an error
        if s.status != 200:
            errors[str(s.status)] = errors.get(str(s.status), 0) + 1
    return {
        "clients": clients, "requests": len(measured), "img_per_s": len(ok_in_window) / duration,
        **percentiles_ms([s.latency for s in measured if s.status == 200]),
        "errors": sum(errors.values()), "errors_by_status": errors,
        "batching": histogram_diff(before, after),
        "stages_mean_ms": {k: statistics.mean(v) for k, v in stages.items()},
    }


def run_server(setup: str, model_tag: str, images: list[tuple[str, bytes]], args: argparse.Namespace,
               log_dir: Path) -> list[dict[str, Any]]:
    env = {"VIT_MODEL_TAG": model_tag, "VIT_DEVICE": args.device, "VIT_MAX_CONCURRENCY": str(args.max_concurrency),
           "VIT_BATCHING": "0" if setup == "unbatched" else "1",
           "VIT_MODE": "split" if setup == "split" else args.mode,
           **dict(kv.split("=", 1) for kv in args.server_env)}
    target = "bench.naive_service:NaiveViT" if setup == "naive" else "vit_service.serving.service:ViTClassifier"
    kind = "naive" if setup == "naive" else "ours"
    log_path = log_dir / f"server_{setup}.log"
    print(f"starting the {setup} server (log: {log_path})")
    results = []
    with local_server(log_path, env, target=target, ready_timeout=args.ready_timeout) as url:
        for n in args.clients:
            row = asyncio.run(load_level(url, images, n, args.warmup, args.duration, kind))
            mean = row["batching"]["mean_batch"] if row["batching"] else 1.0
            stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages_mean_ms"].items())
            print(f"  {setup} {n:>3} clients: {row['img_per_s']:7.1f} img/s, p50 {row['p50_ms'] or 0:.0f} ms, "
                  f"mean batch {mean:.2f}, errors {row['errors']}" + (f"; stages (ms) {stages}" if stages else ""))
            results.append({"setup": setup, **row})
    return results


# ------------------------------------------------------------------------------ report

def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def report(machine: dict[str, Any], raw: list[dict[str, Any]], served: list[dict[str, Any]],
           args: argparse.Namespace, n_images: int) -> list[str]:
    lines = [f"{machine['cpu']}, {machine['cpu_cores']} cores ({machine['torch_threads']} torch threads), "
             f"device {machine['device']}{' (' + machine['gpu'] + ')' if machine['gpu'] else ''}, "
             f"torch {machine['torch']}, bentoml {machine['bentoml']}, Python {machine['python']}",
             "1-min load average at the start of each phase: "
             + ", ".join(f"{k} {v:.1f}" for k, v in machine["load_average_1min"].items()),
             f"model: {args.model_tag or args.preset + ' (random init)'}; {n_images} JPEGs, kind {args.image_kind}; "
             f"{args.duration:g} s per level after {args.warmup:g} s warm-up", "",
             "| setup | clients | img/s | p50 ms | p95 ms | p99 ms | mean batch | batch sizes (≤ bound: batches) | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    best = max(raw, key=lambda r: r["img_per_s"]) if raw else None
    raw1 = next((r for r in raw if r["batch_size"] == 1), None)
    for r, label in ((best, "(a) raw, best batch"), (raw1, "(a) raw, batch 1")):
        if r is not None:
            lines.append(f"| {label} ({r['batch_size']}) | — | {r['img_per_s']:.1f} | {fmt(r['p50_ms'])} | "
                         f"{fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {r['batch_size']} | — | 0 |")
    names = SETUP_NAMES
    for r in served:
        b = r["batching"]
        dist = ", ".join(f"≤{float(k):g}: {v}" for k, v in b["distribution"].items()) if b else "—"
        mean = fmt(b["mean_batch"], 2) if b else "1 (off)"
        errs = f"{r['errors']} {r['errors_by_status']}" if r["errors"] else "0"
        lines.append(f"| {names[r['setup']]} | {r['clients']} | {r['img_per_s']:.1f} | {fmt(r['p50_ms'], 0)} | "
                     f"{fmt(r['p95_ms'], 0)} | {fmt(r['p99_ms'], 0)} | {mean} | {dist} | {errs} |")
    if getattr(args, "decode_rate", None):
        r = args.decode_rate
        lines += ["", f"decode + resize + crop of a 500x375 JPEG on one core: {r['ms_per_img']:.2f} ms CPU time, "
                      f"{r['img_per_cpu_s']:.0f} img/s per core"]
    if raw:
        lines += ["", "(a) rows: latency is per batch call (decode + preprocess + forward of the whole batch).",
                  "raw img/s by batch size: " + ", ".join(f"{r['batch_size']}: {r['img_per_s']:.1f}" for r in raw)]

    stage_rows = [r for r in served if r.get("stages_mean_ms")]
    if stage_rows:
        lines += ["", "Mean stage times from the Server-Timing header (ms): "]
        for r in stage_rows:
            lines.append(f"- {names[r['setup']]}, {r['clients']} clients: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_mean_ms"].items()))

    lines.append("")
    by = {(r["setup"], r["clients"]): r for r in served}
    best_raw = max(raw, key=lambda r: r["img_per_s"]) if raw else None
    for setup in ("batched", "split", "naive"):
        if raw1 and (setup, 1) in by and by[setup, 1]["p50_ms"]:
            ratio = by[setup, 1]["p50_ms"] / raw1["p50_ms"]
            lines.append(f"{names[setup]}: p50 at 1 client / raw batch-1 p50 = {ratio:.2f} "
                         f"({by[setup, 1]['p50_ms']:.1f} / {raw1['p50_ms']:.1f} ms; target <= 1.2 and below (d))")
    for setup in ("batched", "split", "naive"):
        if best_raw and (setup, 16) in by:
            ratio = by[setup, 16]["img_per_s"] / best_raw["img_per_s"]
            lines.append(f"{names[setup]}: throughput at 16 clients / raw best batch = {ratio:.2f} "
                         f"({by[setup, 16]['img_per_s']:.1f} / {best_raw['img_per_s']:.1f} img/s; target >= 0.85 and above (d))")
    for n in args.clients:
        if n >= 16 and ("batched", n) in by and ("unbatched", n) in by and by["unbatched", n]["img_per_s"]:
            ratio = by["batched", n]["img_per_s"] / by["unbatched", n]["img_per_s"]
            lines.append(f"(b)/(c) throughput at {n} clients: {ratio:.2f} (target >= 2 at 32)")
    if served:
        errors = sum(r["errors"] for r in served)
        lines.append(f"errors at {max(args.clients)} or fewer clients (max_concurrency {args.max_concurrency}): "
                     f"{errors} (target 0)")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the servers
        import torch

        torch.set_num_threads(args.threads)

    def stop(signum: int, frame: Any) -> None:  # SIGTERM/SIGHUP: unwind, so servers are killed
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    with tempfile.TemporaryDirectory(prefix="vit-serve-load-") as tmp:
        tag, model_dir = prepare_model(args, Path(tmp) / "bentoml")
        if not args.model_tag:
            print(f"saved random-init {args.preset} as {tag} in the temporary BENTOML_HOME {tmp}/bentoml")
        machine = machine_info(args.device)
        images = load_images(args.images, args.image_kind, args.num_images)
        mean_kb = statistics.mean(len(d) for _, d in images) / 1024
        print(f"{len(images)} JPEGs in memory ({args.image_kind}, mean {mean_kb:.0f} KiB); {machine}")
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)

        raw: list[dict[str, Any]] = []
        served: list[dict[str, Any]] = []
        if "raw" in args.setups:
            print("(a) raw pipeline in this process")
            machine["load_average_1min"]["raw"] = round(os.getloadavg()[0], 2)
            raw = run_raw(model_dir, images, args)
        for setup in ("batched", "unbatched", "naive", "split"):
            if setup in args.setups:
                machine["load_average_1min"][setup] = round(os.getloadavg()[0], 2)
                served += run_server(setup, tag, images, args, log_dir)
        machine["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)

    lines = report(machine, raw, served, args, len(images))
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "decode_rate"}
        args.json.write_text(json.dumps({"machine": machine, "args": config, "model_tag": tag, "raw": raw,
                                         "served": served, "decode_rate": getattr(args, "decode_rate", None), "report": lines}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
