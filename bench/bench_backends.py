"""Inference backends on the CPU, for `python bench/model_speed.py --backends`.

Our VisionTransformer (random init, eval mode) under torch eager fp32, torch bf16 autocast, and
onnxruntime fp32 on the ONNX file `vit-export --onnx` writes (same weights; ONNX parity with torch
is checked first, max |diff| <= 1e-4). Each (model, batch) cell: a warm-up per backend, then
`--repeats` rounds in which every backend runs `--steps` calls, the order rotating each round so
load from other processes hits all alike; the median img/s per backend is reported.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
import torch

from vit_service.formats.onnx_export import export_onnx
from vit_service.host import host_line
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.onnx_backend import make_session

BACKENDS = ("torch fp32", "torch bf16 autocast", "onnxruntime fp32")


def _runners(model: VisionTransformer, onnx_path: str, x: torch.Tensor,
             threads: int | None) -> dict[str, Callable[[], Any]]:
    session = make_session(onnx_path, threads)  # as the service builds it (no spinning threads)
    x_np = x.numpy()

    def torch_run(bf16: bool) -> Callable[[], Any]:
        def run() -> Any:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
            with torch.inference_mode(), ctx:
                return model(x)
        return run

    return {BACKENDS[0]: torch_run(False), BACKENDS[1]: torch_run(True),
            BACKENDS[2]: lambda: session.run(["logits"], {"pixel_values": x_np})[0]}


def backend_main(args: Any, info: dict[str, Any]) -> dict:
    steps = args.steps or 5
    if args.threads:
        torch.set_num_threads(args.threads)
        info = {**info, "torch_threads": args.threads}
    print(host_line())
    print(f"machine: {info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads)")
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = VisionTransformer(ViTConfig.from_preset(name)).eval()
        S = model.config.image_size
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = str(export_onnx(model, tmp))
            for batch in args.batch_sizes:
                x = torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(0))
                run = _runners(model, onnx_path, x, args.threads)
                diff = float(np.abs(run[BACKENDS[2]]() - run[BACKENDS[0]]().numpy()).max())
                if diff > 1e-4:
                    raise AssertionError(f"onnxruntime and torch disagree: max |diff| = {diff:.3g}")
                for fn in run.values():
                    for _ in range(args.warmup):
                        fn()
                samples: dict[str, list[float]] = {b: [] for b in BACKENDS}
                for r in range(args.repeats):
                    order = BACKENDS[r % 3:] + BACKENDS[:r % 3]
                    for b in order:
                        t0 = time.perf_counter()
                        for _ in range(steps):
                            run[b]()
                        samples[b].append(steps * batch / (time.perf_counter() - t0))
                med = {b: statistics.median(v) for b, v in samples.items()}
                rows.append({"model": name, "batch": batch, "onnx_max_abs_diff": diff, "img_s": med,
                             "samples": samples})
                print(f"  {name} batch {batch:>3}: " + "  ".join(f"{b} {v:7.1f}" for b, v in med.items())
                      + f"  (onnx |diff| {diff:.1e})", flush=True)
    print("\n| model | batch | torch fp32 img/s | torch bf16 autocast img/s | onnxruntime fp32 img/s | ort / torch fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["img_s"]
        print(f"| {r['model']} | {r['batch']} | {m[BACKENDS[0]]:.1f} | {m[BACKENDS[1]]:.1f} | "
              f"{m[BACKENDS[2]]:.1f} | {m[BACKENDS[2]] / m[BACKENDS[0]]:.2f} |")
    result = {"steps": steps, "warmup": args.warmup, "repeats": args.repeats, "machine": info, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result
