"""`vit-export`: a training checkpoint, or a pretrained ViT (`--from`), -> a BentoML model holding
everything serving needs; optionally also a transformers folder (`--hf-dir`) and `model.onnx` (`--onnx`)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from training.module import build_model_config
from training.runs import RunError, best_checkpoint
from vit_service.artifact import ModelArtifact
from vit_service.formats.checkpoints import CheckpointError, load_weights
from vit_service.formats.onnx_export import ONNX_FILE, OnnxExportError, export_onnx
from vit_service.formats.pretrained import load_pretrained
from vit_service.formats.transformers_vit import save_transformers_folder
from vit_service.model import VisionTransformer
from vit_service.preprocessing import Preprocessing
from vit_service.serving.store import save_to_bentoml


class ExportError(ValueError):
    pass


def artifact_from_checkpoint(ckpt_path: str | Path, ema: bool = False) -> tuple[VisionTransformer, ModelArtifact]:
    """Rebuilds the trained model and its artifact description from a Lightning checkpoint."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise ExportError(f"{ckpt_path}: no such checkpoint file")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own Lightning file
    except Exception as e:  # any unpickling failure means "not a checkpoint"; say so, don't trace
        raise ExportError(f"{ckpt_path}: not a readable checkpoint ({e})") from None
    hp: dict[str, Any] = dict(ckpt.get("hyper_parameters") or {})
    missing = [k for k in ("preset", "num_classes", "class_names", "preprocessing") if not hp.get(k)]
    if missing:
        raise ExportError(f"{ckpt_path}: not a vit-train checkpoint (hyper-parameters lack {missing})")
    if ema and "current_model_state" not in ckpt:
        raise ExportError(f"{ckpt_path}: has no EMA weights (train with the EMAWeightAveraging callback)")

    config = build_model_config(hp["preset"], hp["num_classes"], hp.get("image_size"), hp.get("model_overrides"),
                                hp.get("init_from"))
    model = VisionTransformer(config)
    load_weights(model, ckpt, prefer_ema=ema)
    info = ckpt.get("vit_service", {})
    dm_hp = ckpt.get("datamodule_hyper_parameters") or {}
    metadata = {
        "source_checkpoint": str(ckpt_path.resolve()),
        "weights": "ema" if ema else "raw",
        "val_acc1": info.get("val_acc1"),
        "val_acc5": info.get("val_acc5"),
        "epoch": info.get("epoch", ckpt.get("epoch")),
        "global_step": info.get("global_step", ckpt.get("global_step")),
        "train_time_s": info.get("train_time_s"),
        "dataset": {"train_dir": dm_hp.get("train_dir"), "val_dir": dm_hp.get("val_dir")},
        "training_config": {k: v for k, v in hp.items() if k != "class_names"},
    }
    artifact = ModelArtifact(config, list(hp["class_names"]), Preprocessing.from_dict(hp["preprocessing"]), metadata)
    return model.eval(), artifact


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
    try:
        if args.from_source:
            model, artifact = load_pretrained(args.from_source, arch=args.arch)
            if artifact.config.num_classes == 0:
                raise ExportError(f"{args.from_source} has no classification head (a backbone): nothing to "
                                  "serve; fine-tune it with vit-train --model.init_from instead")
        else:
            if args.run:
                best = best_checkpoint(args.run)
                args.ckpt = str(best.path)
                print(f"best checkpoint of {args.run} by {best.monitor} ({best.mode}): {best.path.name} "
                      f"({best.monitor} {best.score:.4f})", file=sys.stderr)
            model, artifact = artifact_from_checkpoint(args.ckpt, ema=args.ema)
        # Both before anything is saved: a failed ONNX export (into a temporary folder) and a model
        # transformers cannot express leave no half-made output.
        onnx_file = _export_onnx_first(model) if args.onnx else None
        if args.hf_dir:
            save_transformers_folder(model, artifact, args.hf_dir)
        copy_onnx = (lambda folder: shutil.copy(onnx_file, folder / ONNX_FILE)) if onnx_file else None
        bento_model = save_to_bentoml(args.name, model, artifact, write_extra=copy_onnx)
        if args.dir:
            artifact.save(model, args.dir)
            if copy_onnx:
                copy_onnx(Path(args.dir))
    except (ExportError, CheckpointError, OnnxExportError, RunError) as e:
        print(f"vit-export: error: {e}", file=sys.stderr)
        return 2
    acc = artifact.metadata.get("val_acc1")
    print(f"exported {args.ckpt or args.from_source} ({artifact.config.num_classes} classes"
          + (f", val top-1 {acc:.4f}" if acc is not None else "") + ")", file=sys.stderr)
    print(bento_model.tag)
    return 0


def _add_pretrained_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="from_source", metavar="NAME_OR_DIR",
                   help="export a pretrained ViT instead of a checkpoint: a timm name "
                        "(vit_small_patch16_224.augreg_in21k_ft_in1k, from the Hugging Face cache), a "
                        "transformers ViT folder, an exported model folder, or a weight file with --arch")
    p.add_argument("--arch", help="timm architecture of a bare --from weight file (e.g. vit_base_patch16_224)")
    p.add_argument("--hf-dir", metavar="OUT", help="also write a transformers ViTForImageClassification folder")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (dynamic batch) into the model")


def _export_onnx_first(model: VisionTransformer) -> Path:
    """model.onnx in a temporary folder: a failed export leaves no half-made BentoML model."""
    return export_onnx(model, tempfile.mkdtemp(prefix="vit-export-onnx-"))


if __name__ == "__main__":
    sys.exit(main())
