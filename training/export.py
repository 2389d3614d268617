"""`vit-export`: a training checkpoint, or a pretrained ViT (`--from`), -> a BentoML model holding
everything serving needs; optionally also a transformers folder (`--hf-dir`) and `model.onnx` (`--onnx`)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import bentoml

from vit_service.artifact import ModelArtifact
from vit_service.formats.checkpoints import CheckpointError
from vit_service.formats.onnx_export import ONNX_FILE, OnnxExportError, export_onnx
from vit_service.formats.sources import ModelSourceError, load_model_source
from vit_service.formats.transformers_vit import TransformersFormatError, save_transformers_folder
from vit_service.model import VisionTransformer
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
        onnx_file = _export_onnx_first(model) if args.onnx else None
        copy_onnx = (lambda folder: shutil.copy(onnx_file, folder / ONNX_FILE)) if onnx_file else None
        earlier = _earlier_exports(args.name, artifact)
        bento_model = save_to_bentoml(args.name, model, artifact, write_extra=copy_onnx)
        if args.dir:
            artifact.save(model, args.dir)
            if copy_onnx:
                copy_onnx(Path(args.dir))
    except (ExportError, ModelSourceError, CheckpointError, OnnxExportError) as e:
        print(f"vit-export: error: {e}", file=sys.stderr)
        return 2
    acc = artifact.metadata.get("val_acc1")
    shown = artifact.metadata["source_checkpoint"] if args.run else source  # --run: the checkpoint it chose
    print(f"exported {shown} ({artifact.config.num_classes} classes"
          + (f", val top-1 {acc:.4f}" if acc is not None else "") + f") as {bento_model.tag}", file=sys.stderr)
    if args.dir:
        print(f"model folder: {Path(args.dir) / 'model.safetensors'}, vit_artifact.json", file=sys.stderr)
    if onnx_file:
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


def _export_onnx_first(model: VisionTransformer) -> Path:
    """model.onnx in a temporary folder: a failed export leaves no half-made BentoML model."""
    return export_onnx(model, tempfile.mkdtemp(prefix="vit-export-onnx-"))


if __name__ == "__main__":
    sys.exit(main())
