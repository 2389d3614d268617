"""GPU check: everything worth knowing about this project on one CUDA GPU, in one short run.

Run through `bash bench/gpu_check.sh` (under 8 minutes on one H100/H200-class GPU). Sections, each
written to the JSON file as soon as it is done (so a run cut short keeps what it measured):
    parity      our VisionTransformer vs timm's on the GPU, same weights (timm's random init):
                fp32 logits to 1e-4 (TF32 off), top-1 agreement under bf16 autocast
    throughput  vit_base_patch16_224 forward at batch 256 under bf16 autocast, eager and
                torch.compile, ours beside timm's own model, alternating (median of rounds)
    serving     bench/serve_load.py --device cuda: the service batched vs unbatched at
                1/16/64/256 clients (and the raw decode + forward loop)
    decode      JPEG decode + resize + crop per CPU core (from serve_load's raw phase) against
                the GPU's forward rate: how many cores it takes to feed the GPU
`--dry-run` runs every section on the CPU at tiny sizes (a small ViT, batch 2, one client level,
one torch thread, torch.compile with the "eager" backend) so the test suite keeps this script working without a GPU.

    bash bench/gpu_check.sh                       # writes bench/gpu_check.json and bench/gpu_check.md
    bash bench/gpu_check.sh --dry-run --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from vit_service.host import describe_host, host_line
from vit_service.model import ViTConfig, VisionTransformer

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("parity", "throughput", "serving", "decode")


class TimeLimit(BaseException):
    """SIGTERM (gpu_check.sh's `timeout`): record the section cut short, keep the rest, stop."""


_TERM = {"deferred": False, "pending": False}


def on_term(signum: int, frame: Any) -> None:
    if _TERM["deferred"]:
        _TERM["pending"] = True
        return
    raise TimeLimit()


@contextmanager
def time_limit_deferred() -> Iterator[None]:
    """A SIGTERM while a child process starts is raised when the block ends, once its Popen is
    known and can be stopped: raised inside Popen, after the fork, it left serve_load running."""
    _TERM["deferred"] = True
    try:
        yield
    finally:
        _TERM["deferred"] = False
    if _TERM["pending"]:
        _TERM["pending"] = False
        raise TimeLimit()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, measures nothing useful")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "gpu_check.json",
                   help="JSON results; the Markdown table goes beside it (.md)")
    p.add_argument("--images", type=Path, default=None,
                   help="JPEGs for the serving section (default: serve_load's: $VIT_CIFAR10_DIR, else generated)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := set(args.sections) - set(SECTIONS):
        p.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.images is not None and not args.images.exists():
        p.error(f"--images {args.images}: no such file or folder")
    if args.dry_run:
        args.device = torch.device("cpu")
        args.model, args.overrides, args.batch = "vit_tiny_patch16_224", {"image_size": 64, "depth": 2}, 2
        args.steps, args.rounds, args.compile_backend = 2, 2, "eager"
        args.serve_preset, args.clients, args.level_s = "vit_demo_patch8_64", "1", 1.0
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run on a GPU machine, or use --dry-run to check the script on a CPU")
        args.device = torch.device("cuda")
        args.model, args.overrides, args.batch = "vit_base_patch16_224", {}, 256
        args.steps, args.rounds, args.compile_backend = 20, 3, "inductor"
        args.serve_preset, args.clients, args.level_s = "vit_base_patch16_224", "1,16,64,256", 10.0
    return args


def build_pair(name: str, overrides: dict[str, Any], device: torch.device) -> dict[str, torch.nn.Module]:
    """timm's model (its own random init) and ours loaded with exactly its weights, eval mode."""
    import timm

    torch.manual_seed(0)
    timm_kw = {"img_size" if k == "image_size" else k: v for k, v in overrides.items()}
    theirs = timm.create_model(name, pretrained=False, **timm_kw)
    ours = VisionTransformer(ViTConfig.from_preset(name, **overrides))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return {"ours": ours.to(device).eval(), "timm": theirs.to(device).eval()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.inference_mode()
def check_parity(args: argparse.Namespace, models: dict[str, torch.nn.Module]) -> dict[str, Any]:
    size = models["ours"].config.image_size
    x = torch.randn(max(args.batch, 64) if not args.dry_run else 8, 3, size, size,
                    generator=torch.Generator().manual_seed(1)).to(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for both
    torch.backends.cudnn.allow_tf32 = False
    fp32 = {k: m(x).float() for k, m in models.items()}
    with autocast(args.device, True):
        bf16 = {k: m(x).float() for k, m in models.items()}
    diff = (fp32["ours"] - fp32["timm"]).abs().max().item()
    agree_timm = (bf16["ours"].argmax(-1) == bf16["timm"].argmax(-1)).float().mean().item()
    agree_fp32 = (bf16["ours"].argmax(-1) == fp32["ours"].argmax(-1)).float().mean().item()
    return {"model": args.model, "images": x.shape[0], "fp32_max_abs_diff": diff, "fp32_ok": diff <= 1e-4,
            "bf16_top1_agreement_ours_vs_timm": agree_timm, "bf16_top1_agreement_vs_fp32": agree_fp32,
            "note": "random init and random inputs: logits are close together, so bf16-vs-fp32 agreement "
                    "understates what a trained model shows"}


@torch.inference_mode()
def measure_throughput(args: argparse.Namespace, models: dict[str, torch.nn.Module]) -> list[dict[str, Any]]:
    """img/s of the forward at args.batch under bf16 autocast: (ours, timm) x (eager, compile),
    ours and timm alternating within each round, median of rounds."""
    size = models["ours"].config.image_size
    x = torch.randn(args.batch, 3, size, size, device=args.device)
    rows = []
    for mode in ("eager", "compile"):
        fns = models if mode == "eager" else {k: torch.compile(m, backend=args.compile_backend) for k, m in models.items()}
        compile_s = {}
        for k, fn in fns.items():  # warm-up; for compile, the compilation itself
            t0 = time.perf_counter()
            with autocast(args.device, True):
                for _ in range(2):
                    fn(x)
            sync(args.device)
            compile_s[k] = time.perf_counter() - t0
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(args.rounds):
            for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                sync(args.device)
                t0 = time.perf_counter()
                with autocast(args.device, True):
                    for _ in range(args.steps):
                        fns[k](x)
                sync(args.device)
                samples[k].append(args.steps * args.batch / (time.perf_counter() - t0))
        for k, v in samples.items():
            rows.append({"impl": k, "mode": mode, "dtype": "bf16", "batch": args.batch, "img_per_s": statistics.median(v),
                         "rounds": v, "warmup_s": compile_s[k],
                         "compile_backend": args.compile_backend if mode == "compile" else None})
            print(f"  {k:<4} {mode:<7} bf16 batch {args.batch}: {statistics.median(v):9.1f} img/s "
                  f"(warm-up {compile_s[k]:.1f} s)", flush=True)
    return rows


def run_serving(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """bench/serve_load.py in its own process: the service batched vs unbatched, plus the raw loop."""
    out = tmp / "serve_load.json"
    cmd = [sys.executable, str(REPO / "bench" / "serve_load.py"), "--device", args.device.type,
           "--preset", args.serve_preset, "--setups", "raw,batched,unbatched",
           "--clients", args.clients, "--duration", str(args.level_s), "--warmup", "0.2" if args.dry_run else "3",
           "--raw-batch-sizes", "1" if args.dry_run else "1,64,256",
           "--raw-seconds", "0.2" if args.dry_run else "3", "--image-kind", "photo",
           "--num-images", "2" if args.dry_run else "64", "--max-concurrency", "512", "--json", str(out)]
    if args.images is not None:
        cmd += ["--images", str(args.images)]
    if args.dry_run:  # one torch thread: on a loaded CI machine 2 OpenMP threads wait on each other
        cmd += ["--threads", "1"]
    print("$", " ".join(cmd), flush=True)
    proc = None
    try:
        with time_limit_deferred():
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = proc.communicate()
    except BaseException:  # the time limit or Ctrl-C: let serve_load stop its servers (SIGTERM), then go
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()  # gone before this process exits and reports
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"serve_load.py exited with {proc.returncode}:\n{output[-4000:]}")
    result = json.loads(out.read_text())
    keep = ("setup", "clients", "img_per_s", "p50_ms", "p95_ms", "p99_ms", "errors", "precision")
    return {"command": " ".join(cmd[1:]), "preset": args.serve_preset,
            "raw": [{k: r[k] for k in ("batch_size", "img_per_s", "p50_ms")} for r in result["raw"]],
            "served": [{k: r.get(k) for k in keep} | {"mean_batch": (r["batching"] or {}).get("mean_batch")}
                       for r in result["served"]],
            "decode_rate": result["decode_rate"]}


def decode_vs_gpu(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Cores of JPEG decoding it takes to keep the GPU busy with the served model."""
    rate = (results.get("serving") or {}).get("decode_rate")
    if not rate:
        raise RuntimeError("no decode rate: the serving section did not run or measured no 500x375 JPEGs")
    gpu = [r for r in results.get("throughput") or [] if r["impl"] == "ours"]
    same_model = args.serve_preset == args.model and not args.overrides
    out = {"decode_img_per_core_s": rate["img_per_cpu_s"], "decode_ms_per_img": rate["ms_per_img"],
           "cpu_cores": describe_host()["cores"]}
    out["decode_img_per_s_all_cores"] = out["decode_img_per_core_s"] * out["cpu_cores"]
    for r in gpu:
        key = f"gpu_{r['mode']}_img_per_s"
        out[key] = r["img_per_s"]
        out[f"cores_to_feed_{r['mode']}"] = r["img_per_s"] / out["decode_img_per_core_s"]
    out["note"] = (f"GPU rate: our {args.model} forward at batch {args.batch} (bf16)"
                   + ("" if same_model else f"; the serving section served {args.serve_preset}"))
    return out


def table(results: dict[str, Any]) -> list[str]:
    def f(x: Any, d: int = 1) -> str:
        return "—" if x is None else f"{x:.{d}f}"

    lines = [results["host_line"], f"device: {results['device']}{' (DRY RUN: CPU, tiny sizes)' if results['dry_run'] else ''}",
             f"elapsed {results['elapsed_s']:.0f} s; sections: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in results["section_s"].items()), ""]
    if p := results.get("parity"):
        lines += [f"parity ({p['model']}, {p['images']} images): fp32 max |ours - timm| {p['fp32_max_abs_diff']:.2e} "
                  f"({'ok' if p['fp32_ok'] else 'ABOVE 1e-4'}); bf16 top-1 agreement ours vs timm "
                  f"{p['bf16_top1_agreement_ours_vs_timm']:.3f}, ours bf16 vs fp32 {p['bf16_top1_agreement_vs_fp32']:.3f}", ""]
    if rows := results.get("throughput"):
        lines += ["| model | mode | dtype | batch | img/s | warm-up / compile s |", "|---|---|---|---:|---:|---:|"]
        lines += [f"| {r['impl']} | {r['mode']} | {r['dtype']} | {r['batch']} | {r['img_per_s']:.1f} | {r['warmup_s']:.1f} |"
                  for r in rows]
        lines.append("")
    if s := results.get("serving"):
        lines += [f"serving {s['preset']}: `python {s['command']}`", "",
                  "| setup | clients | img/s | p50 ms | p95 ms | mean batch | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| raw, batch {r['batch_size']} | — | {r['img_per_s']:.1f} | {f(r['p50_ms'])} | — | {r['batch_size']} | 0 |"
                  for r in s["raw"]]
        lines += [f"| {'in-process' if r['setup'] == 'batched' else r['setup']} | {r['clients']} | {r['img_per_s']:.1f} | "
                  f"{f(r['p50_ms'], 0)} | {f(r['p95_ms'], 0)} | {f(r['mean_batch'], 2)} | {r['errors']} |" for r in s["served"]]
        lines.append("")
    if d := results.get("decode"):
        lines.append(f"decode: {d['decode_img_per_core_s']:.0f} img/s per core ({d['decode_ms_per_img']:.2f} ms), "
                     f"{d['decode_img_per_s_all_cores']:.0f} img/s on all {d['cpu_cores']} cores; "
                     + "; ".join(f"GPU {m} {d[f'gpu_{m}_img_per_s']:.0f} img/s = {d[f'cores_to_feed_{m}']:.1f} cores of decoding"
                                 for m in ("eager", "compile") if f"gpu_{m}_img_per_s" in d) + f" ({d['note']})")
    if results["errors"]:
        lines += ["", "FAILED sections: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in results["errors"].items())]
    return lines


def finite(obj: Any) -> Any:
    """NaN/inf become None, so the JSON file stays JSON (a check then sees the missing number)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    host = describe_host()
    results: dict[str, Any] = {"host": host, "host_line": host_line(host), "dry_run": args.dry_run,
                               "device": torch.cuda.get_device_name(0) if args.device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "model": args.model, "section_s": {}, "errors": {}}
    print(results["host_line"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    signal.signal(signal.SIGTERM, on_term)

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - start
        args.out.write_text(json.dumps(finite(results), indent=2))
        args.out.with_suffix(".md").write_text("\n".join(table(results)) + "\n")

    with tempfile.TemporaryDirectory(prefix="vit-gpu-check-") as tmp:
        pair: dict[str, torch.nn.Module] = {}

        def models() -> dict[str, torch.nn.Module]:  # built once, for parity and throughput
            if not pair:
                pair.update(build_pair(args.model, args.overrides, args.device))
            return pair

        steps = {"parity": lambda: check_parity(args, models()), "throughput": lambda: measure_throughput(args, models()),
                 "serving": lambda: run_serving(args, Path(tmp)), "decode": lambda: decode_vs_gpu(results, args)}
        for name in SECTIONS:
            if name not in args.sections:
                continue
            print(f"[{name}]", flush=True)
            t0 = time.perf_counter()
            try:
                results[name] = steps[name]()
            except Exception as e:  # one broken section must not hide the others' figures
                results["errors"][name] = f"{type(e).__name__}: {e}"
                print(f"  {name} FAILED: {type(e).__name__}: {e}", flush=True)
            except TimeLimit:
                results["errors"][name] = "stopped at the time limit (SIGTERM); the sections before it are complete"
                results["section_s"][name] = time.perf_counter() - t0
                save()
                print(f"  {name}: stopped at the time limit; wrote {args.out}", flush=True)
                return 124
            results["section_s"][name] = time.perf_counter() - t0
            save()
    print("\n" + "\n".join(table(results)))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
