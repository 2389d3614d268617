"""fp32 against int8 for one exported model (`vit-export --int8`): top-1 on labelled images and
speed per backend, batch size and thread count.

    python bench/int8_speed.py --model DIR --images DATA/test [--limit 0] [--batches 1 16] [--threads 1 2]

Accuracy: the fp32 torch model (what serving runs) against model.int8.onnx on the same images,
preprocessed as serving does (vit_service/quantize.py). Speed: torch fp32, torch bf16 autocast,
onnxruntime fp32 (model.onnx) and int8 (model.int8.onnx) on random uint8 batches, normalised as the
predictors do; per cell a warm-up call each, then `--rounds` rounds rotating the order so load
from other jobs hits all alike; medians. With one thread the thread's CPU clock is reported too
(other jobs barely change it); wall time on a shared machine measures the neighbours as well.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from vit_service.artifact import load_model
from vit_service.formats.onnx_export import ONNX_FILE
from vit_service.host import describe_host, host_line
from vit_service.quantize import INT8_FILE, evaluation_images, measure_agreement


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def speed(model_dir: Path, model, batches: list[int], threads_list: list[int], rounds: int) -> list[dict]:
    S = model.config.image_size
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        sessions = {"onnxruntime fp32": session(model_dir / ONNX_FILE, threads),
                    "onnxruntime int8": session(model_dir / INT8_FILE, threads)}
        for batch in batches:
            x = torch.randn(batch, 3, S, S)
            xn = x.numpy()

            def torch_run(bf16: bool):
                def run():
                    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
                    with torch.inference_mode(), ctx:
                        model(x)
                return run

            runs = {"torch fp32": torch_run(False), "torch bf16": torch_run(True),
                    **{k: (lambda s=s: s.run(["logits"], {"pixel_values": xn})) for k, s in sessions.items()}}
            wall: dict[str, list[float]] = {k: [] for k in runs}
            cpu: dict[str, list[float]] = {k: [] for k in runs}
            for f in runs.values():
                f()
            names = list(runs)
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    runs[name]()
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.thread_time() - c0)
            base = statistics.median(wall["torch fp32"])
            for name in runs:
                w = statistics.median(wall[name])
                row = {"threads": threads, "batch": batch, "backend": name, "ms": round(w * 1000, 2),
                       "img_s": round(batch / w, 1), "vs_torch_fp32": round(base / w, 2)}
                if threads == 1:
                    c = statistics.median(cpu[name])
                    row["cpu_ms"] = round(c * 1000, 2)
                    row["cpu_vs_torch_fp32"] = round(statistics.median(cpu["torch fp32"]) / c, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported model folder with model.int8.onnx (vit-export --int8 --dir)")
    p.add_argument("--images", help="labelled images (class folders) for top-1 and agreement")
    p.add_argument("--limit", type=int, default=0, help="at most N images (0: all)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    model_dir = Path(args.model)
    host = describe_host()
    print(host_line(host), f"| load average {os.getloadavg()[0]:.1f}", flush=True)
    model, artifact = load_model(model_dir)
    result = {"host": host, "load_average_start": os.getloadavg(), "int8_record": artifact.int8}
    if args.images:
        images = evaluation_images(args.images, artifact.class_names, limit=args.limit or None)
        t0 = time.perf_counter()
        result["accuracy"] = measure_agreement(model, artifact, model_dir / INT8_FILE, images)
        print(json.dumps(result["accuracy"]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    result["speed"] = speed(model_dir, model, args.batches, args.threads, args.rounds)
    result["load_average_end"] = os.getloadavg()
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
