"""`vit-export`: a training checkpoint, or a pretrained ViT (`--from`), -> a BentoML model holding
everything serving needs; optionally also a transformers folder (`--hf-dir`) and `model.onnx` (`--onnx`)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from vit_service.formats.checkpoints import CheckpointError
from vit_service.formats.onnx_export import ONNX_FILE, OnnxExportError, export_onnx
from vit_service.formats.sources import ModelSourceError, load_model_source
from vit_service.formats.transformers_vit import save_transformers_folder
from vit_service.model import VisionTransformer
from vit_service.serving.store import save_to_bentoml


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
    try:
        source = args.ckpt or args.run or args.from_source
        model, artifact = load_model_source(source, ema=args.ema, arch=args.arch)
        if artifact.config.num_classes == 0:
            raise ExportError(f"{source} has no classification head (a backbone): nothing to "
                              "serve; fine-tune it with vit-train --model.init_from instead")
        if args.run:
            best = artifact.metadata["selected_by"]
            print(f"best checkpoint of {args.run} by {best['monitor']} ({best['mode']}): "
                  f"{Path(artifact.metadata['source_checkpoint']).name} ({best['monitor']} {best['score']:.4f})",
                  file=sys.stderr)
        if args.hf_dir:  # first: a model transformers cannot express fails before anything is saved
            save_transformers_folder(model, artifact, args.hf_dir)
        onnx_file = _export_onnx_first(model) if args.onnx else None
        copy_onnx = (lambda folder: shutil.copy(onnx_file, folder / ONNX_FILE)) if onnx_file else None
        bento_model = save_to_bentoml(args.name, model, artifact, write_extra=copy_onnx)
        if args.dir:
            artifact.save(model, args.dir)
            if copy_onnx:
                copy_onnx(Path(args.dir))
    except (ExportError, ModelSourceError, CheckpointError, OnnxExportError) as e:
        print(f"vit-export: error: {e}", file=sys.stderr)
        return 2
    acc = artifact.metadata.get("val_acc1")
    print(f"exported {source} ({artifact.config.num_classes} classes"
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
