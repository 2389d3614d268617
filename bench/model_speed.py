"""Model speed, ours vs timm: same config, same weights, same batch, one process.

Measures forward throughput (inference, no autograd) and train-step throughput (forward +
cross-entropy + backward + AdamW step) in fp32 and under bf16 autocast, and prints a Markdown
table with the ratio ours/timm (> 1 means ours is faster).

Fairness: both models get timm's weights (ours loads timm's state dict strictly and must match
its outputs), the same input tensor and labels, and an identical torch.optim.AdamW, so the
comparison measures the model code only. After a warm-up the two are timed in alternating order
(ours, timm, timm, ours, ...) over several repeats and the median img/s of each is reported, so
that load from other processes on a shared machine hits both alike.

    python bench/model_speed.py                                  # vit_tiny, CPU or GPU
    python bench/model_speed.py --model vit_base_patch16_224 --device cuda --compile

`--backends` measures the runtimes × precisions instead (CPU, the serving Predictor; see
bench/bench_backends.py): torch fp32/bf16, openvino fp32/bf16/int8 and the retired onnxruntime
fp32/dynamic int8, img/s at each batch size, timed in rotating order with the median kept:

    python bench/model_speed.py --backends        # vit_tiny + vit_small, batch 1 and 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vit_service.host import describe_host, host_line
from vit_service.model import PRESETS, ViTConfig, VisionTransformer

IMPLS = ("ours", "timm")
MODES = ("forward", "train-step")
DTYPE_LABELS = {"fp32": "fp32", "bf16": "bf16 autocast"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"a preset: {', '.join(sorted(PRESETS))} "
                   "(default vit_tiny_patch16_224; with --backends, a comma-separated list)")
    p.add_argument("--backends", action="store_true",
                   help="compare torch fp32 / torch bf16 autocast / onnxruntime inference on the CPU")
    p.add_argument("--batch-sizes", default="1,16", help="with --backends: comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=None,
                   help="with --backends: torch and onnxruntime threads (default: each library's own)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 128 on GPU")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=None, help="timed calls per measurement (default: 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per model, mode and dtype")
    p.add_argument("--repeats", type=int, default=5, help="measurements per model, interleaved")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of forward,train-step")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    models = [m.strip() for m in (args.model or "").split(",") if m.strip()]
    for m in models:
        if m not in PRESETS:
            p.error(f"unknown model {m!r}; choose from {sorted(PRESETS)}")
    if len(models) > 1 and not args.backends:
        p.error("several models only with --backends")
    args.models = models or (["vit_tiny_patch16_224", "vit_small_patch16_224"] if args.backends
                             else ["vit_tiny_patch16_224"])
    args.model = args.models[0]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for d in args.dtypes:
        if d not in DTYPE_LABELS:
            p.error(f"unknown dtype {d!r}; choose from {sorted(DTYPE_LABELS)}")
    for m in args.modes:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {list(MODES)}")
    return args


def machine_info(device: torch.device) -> dict[str, Any]:
    host = describe_host()
    cpu = host["cpu"]
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": host["flags"],
        "cpu_cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = cpu
    return info


def build_models(name: str, device: torch.device) -> dict[str, nn.Module]:
    """timm's model with its own random init, and ours loaded with exactly those weights."""
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False)
    ours = VisionTransformer(ViTConfig.from_preset(name))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return {"ours": ours.to(device), "timm": theirs.to(device)}


@torch.no_grad()
def check_parity(models: dict[str, nn.Module], x: torch.Tensor) -> float:
    for m in models.values():
        m.eval()
    diff = (models["ours"](x) - models["timm"](x)).abs().max().item()
    if diff > 1e-4:
        raise AssertionError(f"ours and timm disagree in fp32: max |diff| = {diff:.3g}")
    return diff


def make_step(
    model: nn.Module, mode: str, dtype: str, x: torch.Tensor, y: torch.Tensor,
    opt: torch.optim.Optimizer, compiled: nn.Module | None,
) -> Callable[[], None]:
    """One call of the timed unit: a forward pass, or a full optimiser step."""
    fn = compiled if compiled is not None else model
    device_type = x.device.type
    autocast = (
        (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if dtype == "bf16" else nullcontext
    )
    if mode == "forward":
        def step() -> None:
            with torch.inference_mode(), autocast():
                fn(x)
    else:
        def step() -> None:
            with autocast():
                loss = F.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def time_step(step: Callable[[], None], steps: int, batch_size: int, device: torch.device) -> float:
    """Images per second over `steps` calls; waits for the GPU before reading the clock."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.backends:
        from bench_backends import backend_main  # noqa: PLC0415 (a separate job, its own file)

        return backend_main(args, machine_info(torch.device("cpu")))
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch_size = args.batch_size or (128 if on_gpu else 32)
    steps = args.steps or (20 if on_gpu else 5)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for both models
        torch.backends.cudnn.allow_tf32 = False

    info = machine_info(device)
    print(host_line())
    print(f"machine: {info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads); "
          f"device: {info['device_name']}")
    print(f"torch {info['torch']}, timm {info['timm']}, python {info['python']}")

    models = build_models(args.model, device)
    cfg = models["ours"].config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (batch_size,), generator=g).to(device)
    diff = check_parity(models, x)
    print(f"parity: max |ours - timm| = {diff:.2e} on fp32 logits ({args.model}, batch {batch_size})")
    print(f"timing: {args.warmup} warm-up + {args.repeats} x {steps} timed calls per cell, "
          f"ours/timm interleaved, median reported{', torch.compile' if args.compile else ''}\n")

    compiled = {k: torch.compile(m) for k, m in models.items()} if args.compile else {}
    # Identical optimisers: same class, same hyperparameters, same implementation choice.
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05) for k, m in models.items()}

    rows = []
    for mode in args.modes:
        for dtype in args.dtypes:
            for m in models.values():
                m.train(mode == "train-step")
            step = {k: make_step(models[k], mode, dtype, x, y, opts[k], compiled.get(k)) for k in IMPLS}
            for k in IMPLS:
                time_step(step[k], args.warmup, batch_size, device)
            samples: dict[str, list[float]] = {k: [] for k in IMPLS}
            for r in range(args.repeats):
                # ABBA order: whichever runs second in a pair gets no systematic advantage.
                for k in IMPLS if r % 2 == 0 else IMPLS[::-1]:
                    samples[k].append(time_step(step[k], steps, batch_size, device))
            med = {k: statistics.median(v) for k, v in samples.items()}
            rows.append({
                "mode": mode, "dtype": dtype,
                "ours_img_s": med["ours"], "timm_img_s": med["timm"],
                "ratio": med["ours"] / med["timm"], "samples": samples,
            })
            print(f"  {mode:<10} {DTYPE_LABELS[dtype]:<13} ours {med['ours']:8.1f}  "
                  f"timm {med['timm']:8.1f}  ratio {med['ours'] / med['timm']:.3f}", flush=True)

    print(f"\n{args.model}, batch {batch_size}, {info['device_name']} ({device.type})\n")
    print("| mode | dtype | ours img/s | timm img/s | ours/timm |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {DTYPE_LABELS[r['dtype']]} | {r['ours_img_s']:.1f} | "
              f"{r['timm_img_s']:.1f} | {r['ratio']:.3f} |")

    result = {
        "model": args.model, "batch_size": batch_size, "steps": steps, "warmup": args.warmup,
        "repeats": args.repeats, "compile": args.compile, "parity_max_abs_diff": diff,
        "machine": info, "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
