"""Static int8 for the CPU with an accuracy guard: `vit-export --int8` writes `model.int8.xml` (+ .bin,
OpenVINO's format) and records, in vit_artifact.json ("int8"), how it agrees with the fp32 model on
real images: top-1 agreement and both top-1 accuracies. Serving uses the figures as a guard: int8
only where the recorded agreement is >= MIN_AGREEMENT (99%).

Which int8: NNCF's static post-training quantization of the OpenVINO model (weights int8 per
channel, activations int8 with ranges calibrated on the export's images), served by OpenVINO's VNNI
/ AMX kernels: 1.4-1.7x onnxruntime's dynamic int8 on the avx512_vnni host (bench/README.md,
"Backends"). Transformers collapse when LayerNorm, GELU or softmax are quantized carelessly, so
NNCF's TRANSFORMER model type (which keeps those in float and applies SmoothQuant) is the first try;
where it misses the guard, the second keeps the patch embedding (the convolution reading the raw
pixels) in float too, and the better-agreeing one is kept, recorded with which it was ("recipe").
"""

from __future__ import annotations

import contextlib
import io
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

INT8_FILE = "model.int8.xml"  # OpenVINO IR; its weights in model.int8.bin beside it
MIN_AGREEMENT = 0.99  # int8 is served only where it agreed with fp32 on >= 99% of the images
EVAL_BATCH = 64
CALIBRATION_IMAGES = 300  # NNCF's default subset size
# What each try keeps in float beyond what the TRANSFORMER model type already does: nothing, then the
# patch embedding (node names as openvino.convert_model writes a torch module's). Measured on the
# CIFAR-10 model (bench/README.md, "int8"): of the variants tried, only the float patch embedding
# passed the guard there (every MLP's fc2, the attention's qkv, the head, SmoothQuant settings did not).
RECIPES: list[tuple[str, list[str]]] = [
    ("NNCF TRANSFORMER", []),
    ("NNCF TRANSFORMER, patch_embed in float", [r".*patch_embed\..*"]),
]


class QuantizeError(ValueError):
    """int8 export is not possible: the message names what to install or which folder is wrong."""


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


def _openvino_runner(model: Any, threads: int | None = None) -> Callable[[torch.Tensor], np.ndarray]:
    """Normalised float32 pixels -> logits through an OpenVINO model compiled as serving compiles it."""
    from vit_service.backends.openvino_runtime import compile_for_cpu

    request = compile_for_cpu(model, "int8", threads).create_infer_request()

    def run(pixels: torch.Tensor) -> np.ndarray:
        request.infer({0: pixels.numpy()})
        return np.array(request.get_output_tensor(0).data)  # (B, K)
    return run


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


def measure_agreement(model: VisionTransformer, artifact: ModelArtifact, int8_model: Any,
                      images: list[tuple[str, int | None]]) -> dict[str, Any]:
    """Top-1 of the fp32 torch model (the reference) and of the int8 model (an OpenVINO model or its
    .xml file, compiled as serving compiles it) on the same images, preprocessed as serving does:
    {"images", "labelled", "agreement_top1", "fp32_top1", "int8_top1", "max_prob_diff"}; accuracies
    are None without labelled images."""
    int8 = _openvino_runner(int8_model)
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


def int8_logits(int8_file: str | os.PathLike[str], preprocessing: Preprocessing,
                images: list[tuple[str, int | None]]) -> tuple[np.ndarray, np.ndarray]:
    """`image_logits` of the int8 model (for its ECE with the fp32 model's temperature)."""
    return image_logits(_openvino_runner(str(int8_file)), preprocessing, images)


def build_int8(model: VisionTransformer, artifact: ModelArtifact, out_dir: str | os.PathLike[str],
               images: list[tuple[str, int | None]], measured_on: str,
               log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Writes `out_dir/model.int8.xml` (+ .bin): the first of RECIPES that meets MIN_AGREEMENT, else
    the best-agreeing one, calibrated on up to CALIBRATION_IMAGES of `images` and measured on all of
    them; returns the record for vit_artifact.json's "int8"."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise QuantizeError("int8 export needs openvino and nncf: pip install -e '.[int8]'") from None
    from vit_service.backends.openvino_runtime import convert

    skipped: list[str] = []
    calibration = [pixels.numpy() for pixels, _ in pixel_batches(artifact.preprocessing, images[:CALIBRATION_IMAGES],
                                                                 skipped, batch_size=1)]
    if not calibration:
        raise QuantizeError(f"no readable images to calibrate int8 on ({skipped[0] if skipped else 'none given'})")
    fp32 = convert(model)
    best: tuple[dict[str, Any], Any] | None = None
    for recipe, kept_in_float in RECIPES:
        with _quiet_nncf():
            int8 = nncf.quantize(fp32, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                 subset_size=len(calibration),
                                 ignored_scope=nncf.IgnoredScope(patterns=kept_in_float, validate=False))
        figures = {"recipe": recipe, **measure_agreement(model, artifact, int8, images)}
        log(f"int8 ({recipe}): top-1 agreement with fp32 {figures['agreement_top1']:.2%} on "
            f"{figures['images']} images" + (f"; top-1 fp32 {figures['fp32_top1']:.2%}, int8 {figures['int8_top1']:.2%}"
                                             if figures["labelled"] else ""))
        if best is None or figures["agreement_top1"] > best[0]["agreement_top1"]:
            best = (figures, int8)
        if figures["agreement_top1"] >= MIN_AGREEMENT:
            break
    assert best is not None
    figures, int8 = best
    out = Path(out_dir) / INT8_FILE
    ov.save_model(int8, str(out), compress_to_fp16=False)
    return {"file": INT8_FILE, "weights_file": out.with_suffix(".bin").name, "runtime": "openvino",
            "method": "NNCF static post-training quantization", **figures,
            "calibration_images": len(calibration), "activations": "int8, ranges calibrated at export",
            "measured_on": measured_on, "min_agreement": MIN_AGREEMENT,
            "openvino": ov.get_version().split("-")[0], "nncf": nncf.__version__}


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF logs at INFO and draws progress bars on stdout, which carries only vit-export's model tag."""
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf.set_log_level(logging.INFO)


def int8_guard(record: dict[str, Any] | None, min_agreement: float = MIN_AGREEMENT) -> str | None:
    """Why this model's int8 must not be served (None: it may): no int8 model, or a recorded
    top-1 agreement with fp32 below `min_agreement`."""
    if not record:
        return "the model has no int8 version (export it with vit-export --int8)"
    if record.get("runtime") != "openvino":
        return ("its int8 version was made for onnxruntime by an older vit-export, which serving no longer runs "
                "(re-export it with vit-export --int8)")
    agreement = record.get("agreement_top1")
    if agreement is None:
        return "the model's int8 record has no measured agreement (re-export it with vit-export --int8)"
    if agreement < min_agreement:
        return (f"its int8 version agreed with fp32 on {agreement:.2%} of {record.get('images')} images, "
                f"below the {min_agreement:.0%} guard")
    return None


__all__ = ["INT8_FILE", "MIN_AGREEMENT", "RECIPES", "QuantizeError", "build_int8", "evaluation_images", "image_logits",
           "int8_guard", "int8_logits", "measure_agreement", "pixel_batches"]
