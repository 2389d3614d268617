"""`vit-export`: a training checkpoint, or a pretrained ViT (`--from`), -> a BentoML model holding
everything serving needs; optionally also a transformers folder (`--hf-dir`), `model.onnx` (`--onnx`)
and an int8 model (`--int8`: model.int8.xml + .bin for OpenVINO, calibrated and measured against fp32 on the run's
validation images or `--calib DIR`, the figures recorded in vit_artifact.json).

Every export also fits a temperature on the same images (the run's validation folder or `--calib DIR`,
class folders named like the model's classes: vit_service/calibration.py) and records it with NLL and
ECE before and after as "calibration"; without labels there is no calibration, and it says so. It
records "reference" too: how the served scores are spread over those images, for drift gauges."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import bentoml

from training.run_checkpoints import MODEL_FORMATS
from vit_service.artifact import ModelArtifact
from vit_service.calibration import (MAX_TEMPERATURE, MIN_TEMPERATURE, calibration_record, ece, reference_record,
                                     softmax)
from vit_service.formats.checkpoints import CheckpointError
from vit_service.formats.onnx_export import ONNX_FILE, OnnxExportError, export_onnx
from vit_service.formats.sources import ModelSourceError, load_model_source
from vit_service.formats.transformers_vit import TransformersFormatError, save_transformers_folder
from vit_service.model import VisionTransformer
from vit_service.quantize import (MIN_AGREEMENT, QuantizeError, build_int8, evaluation_images, image_logits,
                                  int8_logits)
from vit_service.serving.store import save_to_bentoml


HF_DIR_SKIPPED = 3  # exit code: everything was exported except the refused --hf-dir folder


class ExportError(ValueError):
    pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vit-export", description=__doc__)
    p.add_argument("--ckpt", help="Lightning checkpoint from vit-train (e.g. runs/demo/version_0/checkpoints/last.ckpt)")
    p.add_argument("--run", help="a vit-train run folder (e.g. runs/demo/version_0): exports its best "
                                 "checkpoint by the monitored metric")
    _add_pretrained_arguments(p)
    p.add_argument("--name", default="vit-classifier", help="BentoML model name (default: vit-classifier)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    p.add_argument("--dir", help="also write the artifact folder here (model.safetensors + vit_artifact.json)")
    args = p.parse_args(argv)
    if sum(map(bool, (args.ckpt, args.run, args.from_source))) != 1:
        p.error("give one of --ckpt (a vit-train checkpoint), --run (a vit-train run folder: its best "
                "checkpoint) or --from (a pretrained model)")
    # model.onnx and the int8 files are made here first (a failed export leaves no half-made BentoML model),
    # copied into the model and --dir, and removed with the folder
    with tempfile.TemporaryDirectory(prefix="vit-export-") as scratch:
        try:
            source = args.ckpt or args.run or args.from_source
            model, artifact = load_model_source(source, ema=args.ema, arch=args.arch, formats=MODEL_FORMATS)
            if artifact.config.num_classes == 0:
                raise ExportError(f"{source} has no classification head (a backbone): nothing to "
                                  "serve; fine-tune it with vit-train --model.init_from instead")
            if args.run:
                best = artifact.metadata["selected_by"]
                print(f"best checkpoint of {args.run} by {best['monitor']} ({best['mode']}): "
                      f"{Path(artifact.metadata['source_checkpoint']).name} ({best['monitor']} {best['score']:.4f})",
                      file=sys.stderr)
            # An exported folder given to --from may carry these records: only this export makes them.
            artifact.int8 = artifact.calibration = artifact.reference = None
            directory, images = _measurement_images(artifact, args)
            _calibrate(model, artifact, directory, images)
            extra = [export_onnx(model, Path(scratch) / "onnx")] if args.onnx else []
            if args.int8:  # model.int8.xml + .bin beside the weights, its figures in vit_artifact.json
                int8_dir = Path(scratch) / "int8"
                int8_dir.mkdir()
                artifact.int8 = _build_int8(model, artifact, int8_dir, directory, images)
                extra += [int8_dir / artifact.int8["file"], int8_dir / artifact.int8["weights_file"]]
                _int8_calibration(artifact, int8_dir / artifact.int8["file"], images)
            copy_extra = (lambda folder: [shutil.copy(f, folder / f.name) for f in extra]) if extra else None
            earlier = _earlier_exports(args.name, artifact)
            bento_model = save_to_bentoml(args.name, model, artifact, write_extra=copy_extra)
            if args.dir:
                artifact.save(model, args.dir)
                if copy_extra:
                    copy_extra(Path(args.dir))
        except (ExportError, ModelSourceError, CheckpointError, OnnxExportError, QuantizeError) as e:
            print(f"vit-export: error: {e}", file=sys.stderr)
            return 2
    acc, seen, total = (artifact.metadata.get(k) for k in ("val_acc1", "val_images", "val_images_total"))
    partial = f" on {int(seen)} of {total} val images" if seen and total and int(seen) < total else ""
    shown = artifact.metadata["source_checkpoint"] if args.run else source  # --run: the checkpoint it chose
    print(f"exported {shown} ({artifact.config.num_classes} classes"
          + (f", val top-1 {acc:.4f}{partial}" if acc is not None else "") + f") as {bento_model.tag}", file=sys.stderr)
    if args.dir:
        print(f"model folder: {Path(args.dir) / 'model.safetensors'}, vit_artifact.json", file=sys.stderr)
    if args.onnx:
        stored = Path(bentoml.models.get(bento_model.tag).path)  # bento_model.path was its staging folder
        places = [stored / ONNX_FILE] + ([Path(args.dir) / ONNX_FILE] if args.dir else [])
        print(f"onnx: {', '.join(map(str, places))}", file=sys.stderr)
    if earlier:
        # A BentoML tag is a new version by design (the store never overwrites); say it rather
        # than reuse, so an export always holds what this code writes today.
        print(f"note: the same weights were exported before as {', '.join(earlier)}; each vit-export makes "
              f"a new tag (remove one with: bentoml models delete {earlier[0]})", file=sys.stderr)
    code = 0
    if args.hf_dir:  # last: a model transformers cannot express loses none of the outputs above
        try:
            save_transformers_folder(model, artifact, args.hf_dir)
            print(f"transformers folder: {args.hf_dir}", file=sys.stderr)
        except TransformersFormatError as e:
            print(f"vit-export: skipped --hf-dir {args.hf_dir}: {e}; everything else was written "
                  f"(exit {HF_DIR_SKIPPED})", file=sys.stderr)
            code = HF_DIR_SKIPPED
    print(bento_model.tag)
    return code


def _earlier_exports(name: str, artifact: ModelArtifact) -> list[str]:
    """Tags of `name` in the store exported from the same checkpoint file (path and mtime) and weights."""
    keys = ("source_checkpoint", "source_checkpoint_mtime", "weights")
    wanted = [artifact.metadata.get(k) for k in keys]
    if None in wanted:  # --from sources: no file identity recorded
        return []
    try:
        models = bentoml.models.list(name)
    except Exception:  # an empty or missing store: nothing exported before
        return []
    same = [m for m in models if [m.info.metadata.get(k) for k in keys] == wanted]
    return [str(m.tag) for m in sorted(same, key=lambda m: m.info.creation_time, reverse=True)]


def _measurement_images(artifact: ModelArtifact, args: argparse.Namespace) -> tuple[str | None, list[tuple[str, int | None]]]:
    """The folder to calibrate (and measure --int8) on, --calib DIR or the run's validation folder,
    and its images (at most --calib-limit, every class in turn); (reason it has none, []) without."""
    if args.calib:
        return args.calib, evaluation_images(args.calib, artifact.class_names, limit=args.calib_limit or None)
    directory = (artifact.metadata.get("dataset") or {}).get("val_dir")
    if not directory or not Path(directory).is_dir():
        return None, []
    return directory, evaluation_images(directory, artifact.class_names, limit=args.calib_limit or None)


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def _calibrate(model: VisionTransformer, artifact: ModelArtifact, directory: str | None,
               images: list[tuple[str, int | None]]) -> None:
    """Sets artifact.calibration (T fitted on the labelled images) and artifact.reference (the served
    scores on all of them), and says what it did in one line each."""
    if not images:
        val_dir = (artifact.metadata.get("dataset") or {}).get("val_dir")
        why = (f"the run's validation folder {val_dir} is not there" if val_dir
               else "no images: the model records no validation folder")
        _say(f"calibration: none ({why}; give --calib DIR with class folders to fit a temperature); "
             "scores are the plain softmax")
        return
    logits, labels = image_logits(model.eval(), artifact.preprocessing, images)
    known = labels >= 0
    source = str(Path(directory).resolve())
    if known.any():
        c = artifact.calibration = calibration_record(logits[known], labels[known], source)
        _say(f"calibration: T={c['temperature']:.2f} on {c['images']} images, ECE {c['ece_before']:.3f} -> "
             f"{c['ece_after']:.3f}, NLL {c['nll_before']:.2f} -> {c['nll_after']:.2f}"
             + (f" (T held at its bound {c['temperature']:g}: the NLL wants it further; is the model trained?)"
                if c["temperature"] in (MIN_TEMPERATURE, MAX_TEMPERATURE) else ""))
    else:
        _say(f"calibration: none (no labels: no folder of {directory} is named like a class of the model); "
             "scores are the plain softmax")
    artifact.reference = reference_record(logits, artifact.temperature)
    _say(f"reference: served scores on {len(logits)} images recorded"
         + ("" if artifact.calibration else " (plain softmax, T = 1: no calibration)"))


def _int8_calibration(artifact: ModelArtifact, int8_file: Path, images: list[tuple[str, int | None]]) -> None:
    """The int8 model's ECE before and after the fp32 model's temperature, in "calibration"."""
    labelled = [(path, label) for path, label in images if label is not None]
    if not artifact.calibration or not labelled:
        return
    logits, labels = int8_logits(int8_file, artifact.preprocessing, labelled)
    t, bins = artifact.calibration["temperature"], artifact.calibration["bins"]
    artifact.calibration["int8"] = {"ece_before": round(ece(softmax(logits), labels, bins), 6),
                                    "ece_after": round(ece(softmax(logits, t), labels, bins), 6)}
    _say(f"calibration (int8): ECE {artifact.calibration['int8']['ece_before']:.3f} -> "
         f"{artifact.calibration['int8']['ece_after']:.3f} with the same T")


def _build_int8(model: VisionTransformer, artifact: ModelArtifact, out_dir: Path, directory: str | None,
                images: list[tuple[str, int | None]]) -> dict[str, Any]:
    """Quantizes the model, calibrated and measured on --calib DIR or the training run's validation folder."""
    if not directory:
        val_dir = (artifact.metadata.get("dataset") or {}).get("val_dir")
        if val_dir:
            raise ExportError(f"--int8: the run's validation folder {val_dir} is not there to calibrate int8 on; "
                              "give --calib DIR")
        raise ExportError("--int8 calibrates the int8 model and measures it against fp32 on real images: give "
                          "--calib DIR (images, in class folders named like the model's classes for accuracy)")
    record = build_int8(model, artifact, out_dir, images, str(Path(directory).resolve()), log=_say)
    if record["agreement_top1"] < MIN_AGREEMENT:
        _say(f"vit-export: warning: int8 agrees with fp32 on only {record['agreement_top1']:.2%} of the images "
             f"(< {MIN_AGREEMENT:.0%}): recorded, but it will not serve (VIT_PRECISION=auto passes it over and "
             "VIT_PRECISION=int8 refuses to start); more or other --calib images may help")
    return record


def _add_pretrained_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_source", metavar="NAME_OR_DIR",
                   help="export a pretrained ViT instead of a checkpoint: a timm name "
                        "(vit_small_patch16_224.augreg_in21k_ft_in1k, from the Hugging Face cache), a "
                        "transformers ViT folder, an exported model folder, or a weight file with --arch")
    p.add_argument("--arch", help="timm architecture of a bare --from weight file (e.g. vit_base_patch16_224)")
    p.add_argument("--hf-dir", metavar="OUT", help="also write a transformers ViTForImageClassification folder "
                                                   "(written last; a model transformers cannot express, e.g. "
                                                   "average pooling, is skipped with a message and exit code 3)")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (dynamic batch) into the model")
    p.add_argument("--int8", action="store_true",
                   help="also write an int8 model (model.int8.xml + .bin: NNCF static quantization for OpenVINO, "
                        "calibrated on the run's validation images or --calib DIR) and record its top-1 agreement "
                        "with fp32 and both accuracies, measured on the same images")
    p.add_argument("--calib", metavar="DIR", help="images to fit the temperature on and to measure --int8 on, "
                                                   "instead of the run's validation folder (class folders named like "
                                                   "the model's classes give labels: calibration and accuracies); "
                                                   "needed with --from for either")
    p.add_argument("--calib-limit", type=int, default=2000, metavar="N",
                   help="calibrate and measure --int8 on at most N images, every class in turn (default 2000; 0: all)")


if __name__ == "__main__":
    sys.exit(main())
