"""Runtimes × precisions on the CPU, for `python bench/model_speed.py --backends`: the table in
bench/README.md ("Backends").

Each cell runs the serving `Predictor` (vit_service/backends/: batch check, normalise, forward,
softmax, as the service runs it) on one runtime and precision: torch fp32 and bf16 autocast,
openvino fp32, bf16 and int8 (NNCF static, calibrated on 32 random images: speed only, a random
model has no meaningful agreement), plus onnxruntime fp32 and dynamic int8 on the same network, the
retired serving path, timed only to show where it stands. bf16 cells run only where the CPU has
avx512_bf16/AMX. Per (model, batch): a warm-up per cell, then `--repeats` rounds in which every cell
runs `--steps` calls, the order rotating each round so load from other processes hits all alike;
the median img/s per cell is reported.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vit_service.artifact import ModelArtifact
from vit_service.backends import load_backend
from vit_service.host import cpu_can_accelerate_bf16, host_line, importable, read_cpu
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import Preprocessing


def _model_folder(name: str, root: Path) -> Path:
    """A random-init model saved as vit-export saves one, with an int8 version (NNCF, 32 random images)."""
    import nncf

    from vit_service.backends.openvino_runtime import convert

    torch.manual_seed(0)
    config = ViTConfig.from_preset(name, num_classes=10)
    model = VisionTransformer(config).eval()
    artifact = ModelArtifact(config, [f"c{i}" for i in range(10)], Preprocessing(config.image_size))
    folder = root / name
    S = config.image_size
    calib = [np.random.default_rng(i).standard_normal((1, 3, S, S)).astype(np.float32) for i in range(32)]
    import openvino as ov

    int8 = nncf.quantize(convert(model), nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER, subset_size=32)
    artifact.save(model, folder)
    ov.save_model(int8, str(folder / "model.int8.xml"), compress_to_fp16=False)
    artifact.int8 = {"file": "model.int8.xml", "runtime": "openvino", "agreement_top1": 1.0, "images": 0,
                     "note": "bench only: random model, agreement not measured"}
    (folder / "vit_artifact.json").unlink()
    artifact.save(model, folder)
    return folder


def _onnxruntime_cells(model: VisionTransformer, folder: Path, threads: int | None) -> dict[str, Callable]:
    """The retired path, on the same network: normalised pixels -> logits (no softmax: a lower bound)."""
    if not importable("onnxruntime", "onnx", "onnxscript"):
        return {}
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from vit_service.formats.onnx_export import export_onnx

    fp32 = export_onnx(model, folder / "ort")
    quantize_dynamic(str(fp32), str(folder / "ort" / "int8.onnx"), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    cells = {}
    for label, path in (("onnxruntime fp32", fp32), ("onnxruntime int8 (dynamic)", folder / "ort" / "int8.onnx")):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        cells[label] = lambda x, s=session: s.run(["logits"], {"pixel_values": x})[0]
    return cells


def backend_main(args: Any, info: dict[str, Any]) -> dict:
    steps = args.steps or 5
    if args.threads:
        torch.set_num_threads(args.threads)
        info = {**info, "torch_threads": args.threads}
    print(host_line())
    bf16 = cpu_can_accelerate_bf16(read_cpu())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = _model_folder(name, Path(tmp))
            cells: dict[str, Callable[[np.ndarray], Any]] = {}
            for backend, precision in [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"),
                                       ("openvino", "bf16"), ("openvino", "int8")]:
                if precision == "bf16" and not bf16:
                    continue
                p = load_backend(folder, backend=backend, device="cpu", precision=precision, threads=args.threads,
                                 cache=Path(tmp) / "cache")
                cells[f"{backend} {precision}"] = p.predict_proba
            model = VisionTransformer(ModelArtifact.read(folder).config)
            cells.update(_onnxruntime_cells(model.eval(), folder, args.threads))
            S = model.config.image_size
            for batch in args.batch_sizes:
                u8 = np.random.default_rng(0).integers(0, 256, (batch, 3, S, S), dtype=np.uint8)
                f32 = (u8.astype(np.float32) / 255 - 0.45) / 0.225
                inputs = {label: (f32 if label.startswith("onnxruntime") else u8) for label in cells}
                for label, fn in cells.items():
                    for _ in range(args.warmup):
                        fn(inputs[label])
                labels = list(cells)
                samples: dict[str, list[float]] = {c: [] for c in labels}
                for r in range(args.repeats):
                    for c in labels[r % len(labels):] + labels[:r % len(labels)]:
                        t0 = time.perf_counter()
                        for _ in range(steps):
                            cells[c](inputs[c])
                        samples[c].append(steps * batch / (time.perf_counter() - t0))
                med = {c: statistics.median(v) for c, v in samples.items()}
                rows.append({"model": name, "batch": batch, "img_s": med, "samples": samples})
                print(f"  {name} batch {batch:>3}: " + "  ".join(f"{c} {v:.1f}" for c, v in med.items()), flush=True)
    labels = list(rows[0]["img_s"]) if rows else []
    print("\n| model | batch | " + " | ".join(f"{c} img/s" for c in labels) + " |")
    print("|---|---:|" + "---:|" * len(labels))
    for r in rows:
        base = r["img_s"]["torch fp32"]
        print(f"| {r['model']} | {r['batch']} | "
              + " | ".join(f"{r['img_s'][c]:.1f} ({r['img_s'][c] / base:.2f}x)" for c in labels) + " |")
    result = {"steps": steps, "warmup": args.warmup, "repeats": args.repeats, "machine": info, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result
