"""int8 CPU inference with an accuracy guard: `vit-export --int8` writes `model.int8.onnx` beside
`model.onnx` and records, in vit_artifact.json ("int8"), how it agrees with the fp32 model on
real images: top-1 agreement and both top-1 accuracies. Serving uses the figures as a guard: int8
only where the recorded agreement is >= MIN_AGREEMENT (99%).

Which int8: onnxruntime *dynamic* quantization (weights int8, activations uint8 with a range taken
per batch). Against torch.ao dynamic int8 and both fp32 runtimes it was the fastest or tied in every
cell measured (bench/README.md, "Which int8: onnxruntime dynamic"), it is a plain file any
onnxruntime loads, and torch.ao's eager quantization is deprecated (torch 2.14 warns it will be
removed). Static quantization was not taken: it needs representative images at export and fixes
activation ranges after LayerNorm/GELU/softmax, where ViTs have outliers; dynamic needs no data to
build. Weights are quantized per tensor first; if that misses the agreement threshold, per output
channel is tried and the better-agreeing one kept (per channel is slower, so it is the fallback).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vit_service.artifact import ModelArtifact
from vit_service.model import VisionTransformer
from vit_service.preprocessing import (IMAGE_EXTENSIONS, InvalidImageError, Preprocessing, is_image_file, list_images,
                                       open_image)

INT8_FILE = "model.int8.onnx"
MIN_AGREEMENT = 0.99  # int8 is served only where it agreed with fp32 on >= 99% of the images
EVAL_BATCH = 64


class QuantizeError(ValueError):
    """int8 export is not possible: the message names what to install or which folder is wrong."""


def quantize_dynamic_int8(fp32_onnx: str | os.PathLike[str], out: str | os.PathLike[str],
                          per_channel: bool = False) -> Path:
    """`fp32_onnx` -> `out`: onnxruntime dynamic quantization of every MatMul/Gemm to int8."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise QuantizeError("int8 export needs onnxruntime: pip install -e '.[onnx]'") from None
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a "consider pre-processing" hint on every call
    try:
        quantize_dynamic(str(fp32_onnx), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
    finally:
        root.setLevel(level)
    return Path(out)


def evaluation_images(directory: str | os.PathLike[str], class_names: list[str],
                      limit: int | None = None) -> list[tuple[str, int | None]]:
    """(path, label) for the images under `directory`: class folders named like the model's classes
    give labels (accuracy), other folders and loose images give None (agreement only). With
    `limit`, classes are taken in turn so a small sample still covers every class."""
    root = Path(directory)
    if not root.is_dir():
        raise QuantizeError(f"{root}: image folder not found (give --calib DIR: a folder of images, in class "
                             "folders named like the model's classes for labels)")
    index = {name: i for i, name in enumerate(class_names)}
    groups: list[list[tuple[str, int | None]]] = []
    loose = sorted(str(p) for p in root.iterdir() if p.is_file() and is_image_file(p))
    if loose:
        groups.append([(p, None) for p in loose])
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = list_images(folder)
        if files:
            groups.append([(p, index.get(folder.name)) for p in files])
    if not groups:
        raise QuantizeError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    images: list[tuple[str, int | None]] = []
    for i in range(max(len(g) for g in groups)):  # round-robin over the groups
        images += [g[i] for g in groups if i < len(g)]
    return images[:limit] if limit else images


class _OnnxRunner:
    """One onnxruntime session over normalised float32 pixels -> logits."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        return self.session.run(["logits"], {"pixel_values": pixels.numpy()})[0]  # (B, K)


def pixel_batches(preprocessing: Preprocessing, images: list[tuple[str, int | None]], skipped: list[str],
                  batch_size: int = EVAL_BATCH) -> Iterator[tuple[torch.Tensor, list[int | None]]]:
    """(normalised (B, 3, S, S) float32 pixels, their labels) over `images`, preprocessed as serving
    does; an unreadable file is left out and its error appended to `skipped` (one bad file does not
    void a measurement)."""
    for start in range(0, len(images), batch_size):
        labels, tensors = [], []
        for path, label in images[start:start + batch_size]:
            try:
                tensors.append(preprocessing.to_uint8(open_image(path)))
            except InvalidImageError as e:
                skipped.append(str(e))
                continue
            labels.append(label)
        if tensors:
            yield preprocessing.normalize(torch.stack(tensors)), labels


def image_logits(run: Callable[[torch.Tensor], np.ndarray | torch.Tensor], preprocessing: Preprocessing,
                 images: list[tuple[str, int | None]]) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float32 logits of `run` (normalised pixels -> logits) over the readable `images`, and
    their (N,) labels (-1 where a folder named no class)."""
    logits, labels, skipped = [], [], []
    for pixels, chunk in pixel_batches(preprocessing, images, skipped):
        with torch.inference_mode():
            logits.append(np.asarray(torch.as_tensor(run(pixels)).float()))
        labels += [-1 if label is None else label for label in chunk]
    if not logits:
        raise QuantizeError(f"no readable images ({skipped[0] if skipped else 'none given'})")
    return np.concatenate(logits), np.asarray(labels, np.int64)


def measure_agreement(model: VisionTransformer, artifact: ModelArtifact, int8_onnx: str | os.PathLike[str],
                      images: list[tuple[str, int | None]]) -> dict[str, Any]:
    """Top-1 of the fp32 torch model (what serving runs) and of the int8 graph on the same images,
    preprocessed as serving does: {"images", "labelled", "agreement_top1", "fp32_top1", "int8_top1",
    "max_prob_diff"}; accuracies are None without labelled images."""
    int8 = _OnnxRunner(Path(int8_onnx))
    model = model.eval()
    agree = correct32 = correct8 = labelled = 0
    max_diff = 0.0
    skipped: list[str] = []
    for pixels, chunk in pixel_batches(artifact.preprocessing, images, skipped):
        with torch.inference_mode():
            p32 = model(pixels).float().softmax(-1).numpy()
        p8 = torch.from_numpy(int8(pixels)).float().softmax(-1).numpy()
        top32, top8 = p32.argmax(1), p8.argmax(1)
        agree += int((top32 == top8).sum())
        max_diff = max(max_diff, float(np.abs(p32 - p8).max()))
        for label, a, b in zip(chunk, top32, top8):
            if label is not None:
                labelled += 1
                correct32 += int(a == label)
                correct8 += int(b == label)
    n = len(images) - len(skipped)
    if n == 0:
        raise QuantizeError(f"no readable images to measure int8 on ({skipped[0] if skipped else 'none given'})")
    return {"images": n, "labelled": labelled, "agreement_top1": round(agree / n, 5),
            "fp32_top1": round(correct32 / labelled, 5) if labelled else None,
            "int8_top1": round(correct8 / labelled, 5) if labelled else None,
            "max_prob_diff": round(max_diff, 5), "unreadable": len(skipped)}


def int8_logits(int8_onnx: str | os.PathLike[str], preprocessing: Preprocessing,
                images: list[tuple[str, int | None]]) -> tuple[np.ndarray, np.ndarray]:
    """`image_logits` of the int8 graph (for its ECE with the fp32 model's temperature)."""
    return image_logits(_OnnxRunner(Path(int8_onnx)), preprocessing, images)


def build_int8(model: VisionTransformer, artifact: ModelArtifact, fp32_onnx: str | os.PathLike[str],
               out_dir: str | os.PathLike[str], images: list[tuple[str, int | None]], measured_on: str,
               log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Writes `out_dir/model.int8.onnx` (per tensor; per channel if that agrees better where per
    tensor misses MIN_AGREEMENT) and returns the record for vit_artifact.json's "int8"."""
    import onnxruntime

    out = Path(out_dir) / INT8_FILE
    best: tuple[dict[str, Any], Path] | None = None
    for per_channel in (False, True):
        path = Path(out_dir) / (f"{INT8_FILE}.per_channel" if per_channel else INT8_FILE)
        quantize_dynamic_int8(fp32_onnx, path, per_channel=per_channel)
        figures = {"weights": "int8 per output channel" if per_channel else "int8 per tensor", **measure_agreement(
            model, artifact, path, images)}
        log(f"int8 ({figures['weights']}): top-1 agreement with fp32 {figures['agreement_top1']:.2%} on "
            f"{figures['images']} images" + (f"; top-1 fp32 {figures['fp32_top1']:.2%}, int8 {figures['int8_top1']:.2%}"
                                             if figures["labelled"] else ""))
        if best is None or figures["agreement_top1"] > best[0]["agreement_top1"]:
            best = (figures, path)
        if figures["agreement_top1"] >= MIN_AGREEMENT:
            break
    assert best is not None
    figures, path = best
    if path != out:
        path.replace(out)
    for leftover in Path(out_dir).glob(f"{INT8_FILE}.*"):
        leftover.unlink()
    return {"file": INT8_FILE, "method": "onnxruntime dynamic quantization", **figures,
            "activations": "uint8, range per batch", "measured_on": measured_on,
            "min_agreement": MIN_AGREEMENT, "onnxruntime": onnxruntime.__version__}


def int8_guard(record: dict[str, Any] | None, min_agreement: float = MIN_AGREEMENT) -> str | None:
    """Why this model's int8 must not be served (None: it may): no int8 model, or a recorded
    top-1 agreement with fp32 below `min_agreement`."""
    if not record:
        return "the model has no int8 version (export it with vit-export --int8)"
    agreement = record.get("agreement_top1")
    if agreement is None:
        return "the model's int8 record has no measured agreement (re-export it with vit-export --int8)"
    if agreement < min_agreement:
        return (f"its int8 version agreed with fp32 on {agreement:.2%} of {record.get('images')} images, "
                f"below the {min_agreement:.0%} guard")
    return None


__all__ = ["INT8_FILE", "MIN_AGREEMENT", "QuantizeError", "build_int8", "evaluation_images", "image_logits",
           "int8_guard", "int8_logits", "measure_agreement", "pixel_batches", "quantize_dynamic_int8"]
