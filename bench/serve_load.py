"""Serving load: the HTTP service under N concurrent clients, against the raw pipeline in one process.

Setups, measured in one run on the same model and the same JPEGs:
    (a) raw       decode + resize/crop + forward in this process, one thread of calls, at several
                  batch sizes (`vit_service.backends.load_backend`, the code the service runs)
    (b) batched   `bentoml serve vit_service.serving.service:ViTClassifier` with adaptive batching
    (c) unbatched the same server with VIT_BATCHING=0: one forward pass per request
    (d) naive     bench/naive_service.py: one batchable BentoML API on PIL images with per-request
                  torchvision transforms, the baseline to beat
    (f) litserve  bench/litserve_service.py: a LitServe LitAPI as LitServe's docs show (timm's eval
                  transform per request, max_batch_size=16, batch_timeout=0.01), the other peer
With --pin, every server and the raw loop run on one core with one torch thread and this process's
load client on another core (Linux CPU affinity, inherited by the servers' processes), so a server
cannot borrow the client's core. On a machine shared with other jobs this narrows, not removes, the
noise.
For the servers, N async clients POST one JPEG each to /classify, back to back, for a fixed time
per concurrency level. Reported: throughput, p50/p95/p99 latency, errors (any status but 200),
the batch-size distribution (read from the batch-size histogram on /metrics before and after
each level), and for our service the mean of each stage of its Server-Timing header.

The model is a random-init preset saved into a temporary BENTOML_HOME unless `--model-tag` names
one in your store: throughput and latency do not depend on the weights' values. The JPEGs come from
--images (a folder, searched recursively, or one file; default $VIT_CIFAR10_DIR), else generated.

    python bench/serve_load.py                                   # vit_tiny, 1/16/32 clients, 20 s each, (a)-(d)
    python bench/serve_load.py --duration 5 --clients 1,16       # a quick smoke run
    python bench/serve_load.py --pin --setups raw,batched,naive,litserve --image-kind photo   # vs the peers
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
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.local_server, whether run as a script or imported

from bench.local_server import free_port, local_server, server_process  # noqa: E402
from vit_service.host import describe_host, host_line  # noqa: E402
SERVER_MAX_BATCH = 16  # the service's VIT_MAX_BATCH_SIZE on a CPU
IMAGES_ENV = "VIT_CIFAR10_DIR"  # a folder of JPEGs (e.g. CIFAR-10's test/ class folders)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_KINDS = {"small": (224, 224), "photo": (500, 375)}  # CIFAR-10 upscaled (bicubic), JPEG q90
SETUP_NAMES = {"raw": "(a) raw", "batched": "(b) service, adaptive batching", "unbatched": "(c) service, batching off",
               "naive": "(d) naive BentoML service",
               "litserve": "(f) LitServe service"}
PEERS = ("naive", "litserve")  # what a user would pick instead of our service


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit_tiny_patch16_224", help="random-init model preset (without --model-tag)")
    p.add_argument("--model-tag", default=None, help="use this model from your BentoML store instead")
    p.add_argument("--images", type=Path, default=os.environ.get(IMAGES_ENV) or None,
                   help=f"folder of JPEGs (searched recursively) or one JPEG; default ${IMAGES_ENV}, "
                        "else generated images")
    p.add_argument("--image-kind", default="mix", choices=["small", "photo", "mix"],
                   help="small: 224x224, photo: 500x375, mix: half each")
    p.add_argument("--num-images", type=int, default=200, help="distinct images held in memory, cycled")
    p.add_argument("--clients", default="1,16,32", help="comma-separated concurrency levels")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level")
    p.add_argument("--raw-batch-sizes", default="1,8,16,32")
    p.add_argument("--raw-seconds", type=float, default=None, help="seconds per raw batch size (default: --duration / 2)")
    p.add_argument("--setups", default="raw,batched,unbatched,naive",
                   help="comma-separated subset of raw,batched,unbatched,naive,litserve")
    p.add_argument("--raw-int8", action="store_true",
                   help="also run the raw loop on openvino int8 (model.int8.xml, what vit-export --int8 writes): "
                        "the int8 ceiling beside the peers")
    p.add_argument("--int8", action="store_true",
                   help="the generated model also holds model.int8.xml with its record (vit-export --int8's), "
                        "agreement measured on the benchmark's JPEGs; then --precision int8 serves it")
    p.add_argument("--pin", action="store_true",
                   help="servers and the raw loop on one core with one torch thread, the load client on another")
    p.add_argument("--precision", default="auto",
                   help="VIT_PRECISION of our servers and the raw loop's precision (the peers run fp32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (VIT_DEVICE)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the raw run and the server (OMP_NUM_THREADS); default: torch's")
    p.add_argument("--max-concurrency", type=int, default=64, help="VIT_MAX_CONCURRENCY of the server")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra server setting, e.g. VIT_MAX_LATENCY_MS=5000 (repeatable)")
    p.add_argument("--onnx", action="store_true",
                   help="the generated model also holds model.onnx (openvino then reads it instead of converting)")
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
    args.server_cores = args.client_cores = None
    if args.pin:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if len(cores) < 2:
            p.error(f"--pin needs two usable cores (Linux CPU affinity); this process has {len(cores) or 'no'}")
        if args.threads not in (None, 1):
            p.error("--pin runs one torch thread: leave out --threads")
        args.threads = 1
        args.server_cores, args.client_cores = {cores[0]}, {cores[1]}
    if args.int8 and args.model_tag:
        p.error("--int8 adds int8 to the generated model; for a store model, export it with vit-export --int8")
    if args.images is not None and not args.images.exists():
        p.error(f"--images {args.images}: no such file or folder")
    if max(args.clients) >= args.max_concurrency:
        print(f"note: {max(args.clients)} clients reach --max-concurrency {args.max_concurrency}: expect 429s")
    return args


# ------------------------------------------------------------------------------ machine, images

def machine_info(device: str) -> dict[str, Any]:
    import bentoml
    import torch

    from vit_service.backends.torch_runtime import resolve_device

    host = describe_host()
    dev = resolve_device(device)
    return {
        "host_line": host_line(host),
        "cpu": host["cpu"], "cpu_flags": host["flags"], "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "bentoml": bentoml.__version__, "python": platform.python_version(),
        "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "load_average_1min": {"start": round(os.getloadavg()[0], 2)},  # then at each phase, see main()
    }


def generated_image(i: int) -> Image.Image:
    """A stand-in photo when no JPEGs are given: smooth random colour fields plus grain, so it
    compresses like a photo (not like a flat colour), seeded by `i`."""
    rng = np.random.default_rng(i)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((64, 48), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 12, (48, 64, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def load_images(source: Path | None, kind: str, n: int) -> list[tuple[str, bytes]]:
    """n source images, evenly spread over `source` (a folder, searched recursively, or one JPEG;
    None: generated ones), upscaled to the kind's size and re-encoded as JPEG quality 90:
    [(name, bytes)], alternating sizes for "mix"."""
    if source is None:
        picks: list[Any] = list(range(n))
    else:
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        if not files:
            raise SystemExit(f"--images {source}: no .jpg/.jpeg files there")
        picks = [files[i * len(files) // n] for i in range(min(n, len(files)))]
    sizes = [IMAGE_KINDS["small"], IMAGE_KINDS["photo"]] if kind == "mix" else [IMAGE_KINDS[kind]]
    out = []
    for i, path in enumerate(picks):
        size = sizes[i % len(sizes)]
        if isinstance(path, int):
            big, path = generated_image(path).resize(size, Image.Resampling.BICUBIC), Path(f"generated/{path:04d}")
        else:
            try:
                with Image.open(path) as img:
                    big = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            except OSError as e:
                raise SystemExit(f"--images: cannot read {path} as an image ({e})") from None
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=90)
        out.append((f"{path.parent.name}_{path.stem}_{size[0]}x{size[1]}.jpg", buf.getvalue()))
    return out


def prepare_model(args: argparse.Namespace, home: Path,
                  images: list[tuple[str, bytes]] | None = None) -> tuple[str, Path]:
    """(model tag, model directory). Sets BENTOML_HOME to `home` unless --model-tag is given.
    With --int8, the model also holds model.int8.xml and its record, as `vit-export --int8`
    writes them, the agreement with fp32 measured on `images` (the benchmark's JPEGs)."""
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
    write_extra = None
    if args.onnx or args.int8:  # model.onnx / model.int8.xml beside the weights, as vit-export writes them
        staging = Path(tempfile.mkdtemp(prefix="extra-", dir=home.parent))
        if args.onnx:
            from vit_service.formats.onnx_export import export_onnx

            export_onnx(model, staging)
        if args.int8:
            artifact.int8 = add_int8(model, artifact, staging, images or [])
        write_extra = lambda folder: [shutil.copy(f, folder) for f in staging.iterdir() if f.is_file()]  # noqa: E731
    tag = save_to_bentoml("vit-bench", model, artifact, write_extra=write_extra).tag
    return str(tag), Path(bentoml.models.get(tag).path)  # its path in the store, not the staging one


@contextlib.contextmanager
def pinned(cores: set[int] | None):
    """This thread (and any process or thread it starts meanwhile) runs on `cores`; None: unchanged."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


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


def add_int8(model: Any, artifact: Any, out_dir: Path, images: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Writes model.int8.xml (+ .bin) into `out_dir` with `vit_service.quantize.build_int8`, the function
    `vit-export --int8` runs (so the benchmark runs the int8 model the exporter writes), calibrated and
    its agreement with fp32 measured on `images` (the benchmark's JPEGs, unlabelled); returns its record."""
    from vit_service.quantize import build_int8

    calib = Path(tempfile.mkdtemp(prefix="calib-"))  # build_int8 reads files
    for name, data in images:
        (calib / name).write_bytes(data)
    return build_int8(model, artifact, out_dir, [(str(p), None) for p in sorted(calib.iterdir())],
                      "bench/serve_load.py's JPEGs", log=lambda line: print(f"  {line}"))


def int8_model_dir(model_dir: Path, out: Path, images: list[tuple[str, bytes]]) -> Path:
    """A model folder holding model.int8.xml as `vit-export --int8` writes it, for the raw int8 loop:
    `model_dir` itself where it has one (exported with --int8, or generated here with --int8), else
    a copy of it to which `add_int8` adds one. The served model is left as it was."""
    from vit_service.artifact import MANIFEST_FILE, load_model
    from vit_service.quantize import INT8_FILE

    if (model_dir / INT8_FILE).is_file():
        return model_dir
    shutil.copytree(model_dir, out)
    model, artifact = load_model(model_dir)
    artifact.int8 = add_int8(model, artifact, out, images)
    (out / MANIFEST_FILE).unlink()
    artifact.save(model, out)
    return out


def raw_predictor(model_dir: Path, precision: str, threads: int | None) -> Any:
    """openvino at `precision` on the folder's model, past the int8 guard (a random-init model has no
    int8 that passes it): the raw loop's ceiling, never what the service would serve unguarded."""
    from vit_service.backends.base import ModelSource, Predictor
    from vit_service.backends.openvino_runtime import OpenVINORuntime

    source = ModelSource(model_dir)
    return Predictor(source, OpenVINORuntime(source, precision, threads=threads))


@dataclass
class RawRun:
    """The raw loop's rows (one per batch size) and the precision it ran in."""
    rows: list[dict[str, Any]]
    precision: str


def run_raw(model_dir: Path, images: list[tuple[str, bytes]], args: argparse.Namespace,
            int8: bool = False) -> RawRun:
    """Decode, preprocess and forward in this process, one batch after another, per batch size.
    Decoding uses the server's settings (JPEG draft mode on, default pixel limit). The predictor is
    the server's: `load_backend` with the same settings and VIT_CACHE_DIR, so the backend decision
    kept for this host (measured here first, when none is kept) is the one the server reads.
    `int8`: the folder's model.int8.xml (int8_model_dir) on openvino."""
    from vit_service.backends import load_backend
    from vit_service.preprocessing import decode_image

    predictor = (raw_predictor(model_dir, "int8", args.threads) if int8 else
                 load_backend(model_dir, device=args.device, precision=args.precision, threads=args.threads))
    predictor.warmup(SERVER_MAX_BATCH)  # the server's default VIT_MAX_BATCH_SIZE: the same decision key
    for b in args.raw_batch_sizes:  # warm every batch size timed below
        predictor.predict_proba(np.zeros((b, *predictor.input_shape), np.uint8))
    print(f"  raw backend: {predictor.backend} {predictor.precision}"
          + (f" ({predictor.decision['reason']}; rates {predictor.decision['rates_img_s']})" if predictor.decision else ""))
    pre = predictor.preprocessing
    precision = f"{predictor.backend} {predictor.precision}"
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
        row = {"batch_size": b, "precision": precision, "batches": len(times), "img_per_s": b * len(times) / sum(times),
               **percentiles_ms(times)}
        print(f"  raw {precision} batch {b:>3}: {row['img_per_s']:7.1f} img/s, p50 {row['p50_ms']:.1f} ms per batch")
        results.append(row)
    return RawRun(results, precision)


# ------------------------------------------------------------------------------ (b), (c) server

_HIST = re.compile(r'^(\w+)_(bucket|count|sum)(?:\{([^}]*)\})? (\S+)', re.MULTILINE)
# Where each server reports its batch sizes: (metric, a label every sample must carry).
BATCH_METRICS = {"ours": [("vit_batch_size", "")],
                 "naive": [("bentoml_service_adaptive_batch_size", 'method_name="classify"')],
                 "litserve": []}  # LitServe exposes no batch sizes: its rows show none


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

        async def histogram() -> dict[str, float]:
            return batch_histogram((await http.get("/metrics")).text, kind) if BATCH_METRICS[kind] else {}

        async def snapshot_at(t: float) -> dict[str, float]:
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            return await histogram()

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        before = await snapshot_at(t0)
        await asyncio.gather(*tasks)
        after = await histogram()

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


@contextlib.contextmanager
def litserve_server(log_path: Path, model_dir: Path, env: dict[str, str], device: str, ready_timeout: float):
    """bench/litserve_service.py on 127.0.0.1:<free port> in its own process group; yields its URL
    once LitServe's /health answers 200 (its workers have run setup), and always kills it."""
    port = free_port()
    accelerator = {"auto": "auto", "cpu": "cpu"}.get(device, "cuda")
    cmd = [sys.executable, str(REPO / "bench" / "litserve_service.py"), "--model-dir", str(model_dir),
           "--port", str(port), "--accelerator", accelerator]
    # /health answers 200 once LitServe's workers have run setup
    with server_process(cmd, port, log_path, env, ready_timeout, REPO, "/health", name="the LitServe server") as url:
        yield url


def served_precision(url: str) -> str | None:
    """The precision our service reports on /model_info (None if it says none)."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        found = re.search(r'"precision":\s*"(\w+)"', httpx.get(f"{url}/model_info", timeout=10).text)
        return found.group(1) if found else None
    return None


def run_server(setup: str, model_tag: str, model_dir: Path, images: list[tuple[str, bytes]],
               args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    env = {"VIT_MODEL_TAG": model_tag, "VIT_DEVICE": args.device, "VIT_MAX_CONCURRENCY": str(args.max_concurrency),
           "VIT_BATCHING": "0" if setup == "unbatched" else "1",
           "VIT_PRECISION": args.precision,
           **({"VIT_TORCH_THREADS": "1"} if args.pin else {}),
           **dict(kv.split("=", 1) for kv in args.server_env)}
    kind = setup if setup in PEERS else "ours"
    log_path = log_dir / f"server_{setup}.log"
    print(f"starting the {setup} server (log: {log_path})" + (f", pinned to core {args.server_cores}" if args.pin else ""))
    if setup == "litserve":
        server = litserve_server(log_path, model_dir, env, args.device, args.ready_timeout)
    else:
        target = "bench.naive_service:NaiveViT" if setup == "naive" else "vit_service.serving.service:ViTClassifier"
        server = local_server(log_path, env, target=target, ready_timeout=args.ready_timeout)
    results = []
    with pinned(args.server_cores), server as url, pinned(args.client_cores):  # started on the server core
        precision = served_precision(url) if kind == "ours" else "fp32"
        for n in args.clients:
            row = asyncio.run(load_level(url, images, n, args.warmup, args.duration, kind))
            row["precision"] = precision
            mean = f"{row['batching']['mean_batch']:.2f}" if row["batching"] else "1" if setup == "unbatched" else "—"
            stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages_mean_ms"].items())
            print(f"  {setup} {n:>3} clients: {row['img_per_s']:7.1f} img/s, p50 {row['p50_ms'] or 0:.0f} ms, "
                  f"mean batch {mean}, errors {row['errors']}" + (f"; stages (ms) {stages}" if stages else ""))
            results.append({"setup": setup, **row})
    return results


# ------------------------------------------------------------------------------ report

def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


@dataclass
class Results:
    """What one run measured: report() and the JSON file read it."""
    machine: dict[str, Any]
    raw: list[dict[str, Any]] = field(default_factory=list)
    raw_precision: str | None = None
    raw_int8: list[dict[str, Any]] = field(default_factory=list)
    served: list[dict[str, Any]] = field(default_factory=list)
    decode_rate: dict[str, float] | None = None  # decode + resize + crop per core (decode_rate_per_core)


def ratio_lines(results: Results) -> list[str]:
    """Our service against the raw loop and against the best peer, as ratios with their figures:
    16-client throughput / raw batch 16 (else the best raw batch), p50 at 1 client / raw batch 1
    and / the best peer's, 16-client throughput / the best peer's. Targets for these ratios are
    bench/README.md's, not this script's."""
    raw, served = results.raw, results.served
    by = {(r["setup"], r["clients"]): r for r in served}
    raw1 = next((r for r in raw if r["batch_size"] == 1), None)
    raw16 = next((r for r in raw if r["batch_size"] == 16), None) or (max(raw, key=lambda r: r["img_per_s"]) if raw else None)
    peers16 = [by[p, 16] for p in PEERS if (p, 16) in by]
    peers1 = [by[p, 1] for p in PEERS if (p, 1) in by and by[p, 1]["p50_ms"]]
    best16 = max(peers16, key=lambda r: r["img_per_s"]) if peers16 else None
    best1 = min(peers1, key=lambda r: r["p50_ms"]) if peers1 else None

    out = []
    for setup in ("batched",):
        name = SETUP_NAMES[setup]
        if (setup, 16) in by and raw16:
            r = by[setup, 16]
            same = r.get("precision") == results.raw_precision
            out.append(f"{name}, 16 clients / raw batch {raw16['batch_size']}: {r['img_per_s'] / raw16['img_per_s']:.2f} "
                       f"({r['img_per_s']:.1f} / {raw16['img_per_s']:.1f} img/s"
                       + ("" if same else f"; precisions differ: {r.get('precision')} vs raw {results.raw_precision}") + ")")
        if (setup, 1) in by and by[setup, 1]["p50_ms"] and raw1:
            p50 = by[setup, 1]["p50_ms"]
            out.append(f"{name}, p50 at 1 client / raw batch 1: {p50 / raw1['p50_ms']:.2f} "
                       f"({p50:.1f} / {raw1['p50_ms']:.1f} ms)")
            if best1:
                out.append(f"{name}, p50 at 1 client / best peer {SETUP_NAMES[best1['setup']]}: "
                           f"{p50 / best1['p50_ms']:.2f} ({p50:.1f} / {best1['p50_ms']:.1f} ms)")
        if (setup, 16) in by and best16:
            r = by[setup, 16]
            out.append(f"{name} ({r.get('precision')}), 16 clients / best peer {SETUP_NAMES[best16['setup']]}: "
                       f"{r['img_per_s'] / best16['img_per_s']:.2f} ({r['img_per_s']:.1f} / {best16['img_per_s']:.1f} img/s)")
    return out


def report(results: Results, args: argparse.Namespace, n_images: int) -> list[str]:
    machine, raw, raw_int8, served = results.machine, results.raw, results.raw_int8, results.served
    pin = (f"pinned: servers and the raw loop on core {sorted(args.server_cores)[0]} with 1 torch thread, "
           f"the load client on core {sorted(args.client_cores)[0]}" if args.pin else "not pinned")
    lines = [machine.get("host_line", ""),
             f"{machine['cpu']}, {machine['cpu_cores']} cores ({machine['torch_threads']} torch threads), "
             f"device {machine['device']}{' (' + machine['gpu'] + ')' if machine['gpu'] else ''}, "
             f"torch {machine['torch']}, bentoml {machine['bentoml']}, Python {machine['python']}",
             "1-min load average at the start of each phase: "
             + ", ".join(f"{k} {v:.1f}" for k, v in machine["load_average_1min"].items()),
             f"model: {args.model_tag or args.preset + ' (random init)'}; {n_images} JPEGs, kind {args.image_kind}; "
             f"{args.duration:g} s per level after {args.warmup:g} s warm-up; {pin}", "",
             "| setup | precision | clients | img/s | p50 ms | p95 ms | p99 ms | mean batch | batch sizes (≤ bound: batches) | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    best = max(raw, key=lambda r: r["img_per_s"]) if raw else None
    raw1 = next((r for r in raw if r["batch_size"] == 1), None)
    best8 = max(raw_int8, key=lambda r: r["img_per_s"]) if raw_int8 else None
    raw8_1 = next((r for r in raw_int8 if r["batch_size"] == 1), None)
    for r, label in ((best, "(a) raw, best batch"), (raw1, "(a) raw, batch 1"),
                     (best8, "(a) raw int8 (openvino), best batch"), (raw8_1, "(a) raw int8 (openvino), batch 1")):
        if r is not None:
            lines.append(f"| {label} ({r['batch_size']}) | {r.get('precision', '—')} | — | "
                         f"{r['img_per_s']:.1f} | {fmt(r['p50_ms'])} | "
                         f"{fmt(r['p95_ms'])} | {fmt(r['p99_ms'])} | {r['batch_size']} | — | 0 |")
    names = SETUP_NAMES
    for r in served:
        b = r["batching"]
        dist = ", ".join(f"≤{float(k):g}: {v}" for k, v in b["distribution"].items()) if b else "—"
        mean = fmt(b["mean_batch"], 2) if b else ("1 (off)" if r["setup"] == "unbatched" else "—")
        errs = f"{r['errors']} {r['errors_by_status']}" if r["errors"] else "0"
        lines.append(f"| {names[r['setup']]} | {r.get('precision') or '—'} | {r['clients']} | {r['img_per_s']:.1f} | "
                     f"{fmt(r['p50_ms'], 0)} | "
                     f"{fmt(r['p95_ms'], 0)} | {fmt(r['p99_ms'], 0)} | {mean} | {dist} | {errs} |")
    if results.decode_rate:
        r = results.decode_rate
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

    lines += [""] + ratio_lines(results)
    peers16 = [r for r in served if r["setup"] in PEERS and r["clients"] == 16]
    peers1 = [r for r in served if r["setup"] in PEERS and r["clients"] == 1 and r["p50_ms"]]
    if best8 and peers16:  # the ceiling an int8 service could reach, against the peers' fp32
        peer = max(peers16, key=lambda r: r["img_per_s"])
        lines.append(f"int8 ceiling: raw int8 batch {best8['batch_size']} / best peer {SETUP_NAMES[peer['setup']]} "
                     f"at 16 clients = {best8['img_per_s'] / peer['img_per_s']:.2f} ({best8['img_per_s']:.1f} / "
                     f"{peer['img_per_s']:.1f} img/s)")
    if raw8_1 and peers1:
        peer = min(peers1, key=lambda r: r["p50_ms"])
        lines.append(f"int8 ceiling: raw int8 batch-1 p50 / best peer {SETUP_NAMES[peer['setup']]} p50 at 1 client = "
                     f"{raw8_1['p50_ms'] / peer['p50_ms']:.2f} ({raw8_1['p50_ms']:.1f} / {peer['p50_ms']:.1f} ms)")
    by = {(r["setup"], r["clients"]): r for r in served}
    for n in args.clients:
        if n >= 16 and ("batched", n) in by and ("unbatched", n) in by and by["unbatched", n]["img_per_s"]:
            ratio = by["batched", n]["img_per_s"] / by["unbatched", n]["img_per_s"]
            lines.append(f"(b)/(c) throughput at {n} clients: {ratio:.2f}")
    if served:
        errors = sum(r["errors"] for r in served)
        lines.append(f"errors at {max(args.clients)} or fewer clients (max_concurrency {args.max_concurrency}): {errors}")
    return lines


def main(argv: list[str] | None = None) -> None:
    from vit_service.artifact import ModelArtifact

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
        # A cache of this run's own: the raw loop measures the backend decision and keeps it there,
        # the servers (which inherit the variable) read it; no earlier run's verdict is reused.
        os.environ["VIT_CACHE_DIR"] = str(Path(tmp) / "cache")
        images = load_images(args.images, args.image_kind, args.num_images)
        tag, model_dir = prepare_model(args, Path(tmp) / "bentoml", images)
        if not args.model_tag:
            print(f"saved random-init {args.preset} as {tag} in the temporary BENTOML_HOME {tmp}/bentoml")
        results = Results(machine_info(args.device))
        machine = results.machine
        print(machine["host_line"])
        mean_kb = statistics.mean(len(d) for _, d in images) / 1024
        print(f"{len(images)} JPEGs in memory ({args.image_kind}, mean {mean_kb:.0f} KiB); {machine}")
        log_dir = args.log_dir or Path(tmp)
        log_dir.mkdir(parents=True, exist_ok=True)

        if "raw" in args.setups:
            print("(a) raw pipeline in this process")
            machine["load_average_1min"]["raw"] = round(os.getloadavg()[0], 2)
            with pinned(args.server_cores):
                pre = ModelArtifact.read(model_dir).preprocessing
                results.decode_rate = decode_rate_per_core(images, pre.image_size, pre.resize_size, args.raw_seconds) or None
                if results.decode_rate:
                    print(f"  decode + resize + crop of a 500x375 JPEG: {results.decode_rate['ms_per_img']:.2f} ms of CPU, "
                          f"{results.decode_rate['img_per_cpu_s']:.0f} img/s per core")
                run = run_raw(model_dir, images, args)
                results.raw, results.raw_precision = run.rows, run.precision
                if args.raw_int8:
                    print("(a) raw pipeline, openvino int8 (model.int8.xml, as vit-export --int8 writes it)")
                    results.raw_int8 = run_raw(int8_model_dir(model_dir, Path(tmp) / "int8", images), images, args,
                                               int8=True).rows
        for setup in args.setups:  # in the order given: rerun in another order to see drift on a shared machine
            if setup != "raw":
                machine["load_average_1min"][setup] = round(os.getloadavg()[0], 2)
                results.served += run_server(setup, tag, model_dir, images, args, log_dir)
        machine["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)

    lines = report(results, args, len(images))
    print("\n" + "\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else sorted(v) if isinstance(v, set) else v)
                  for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"machine": machine, "args": config, "model_tag": tag, "raw": results.raw,
                                         "raw_precision": results.raw_precision, "raw_int8": results.raw_int8,
                                         "served": results.served, "decode_rate": results.decode_rate,
                                         "report": lines}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
