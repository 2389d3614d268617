"""`vit-export`: a training checkpoint -> a BentoML model holding everything serving needs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from training.module import build_model_config
from training.runs import RunError, best_checkpoint
from vit_service.artifact import ModelArtifact
from vit_service.formats.checkpoints import CheckpointError, load_weights
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

    config = build_model_config(hp["preset"], hp["num_classes"], hp.get("image_size"), hp.get("model_overrides"))
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
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="Lightning checkpoint from vit-train (e.g. runs/demo/version_0/checkpoints/last.ckpt)")
    source.add_argument("--run", help="a vit-train run folder (e.g. runs/demo/version_0): exports its best "
                                      "checkpoint by the monitored metric")
    p.add_argument("--name", default="vit-classifier", help="BentoML model name (default: vit-classifier)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    p.add_argument("--dir", help="also write the artifact folder here (model.safetensors + vit_artifact.json)")
    args = p.parse_args(argv)
    try:
        if args.run:
            best = best_checkpoint(args.run)
            args.ckpt = str(best.path)
            print(f"best checkpoint of {args.run} by {best.monitor} ({best.mode}): {best.path.name} "
                  f"({best.monitor} {best.score:.4f})", file=sys.stderr)
        model, artifact = artifact_from_checkpoint(args.ckpt, ema=args.ema)
        bento_model = save_to_bentoml(args.name, model, artifact)
        if args.dir:
            artifact.save(model, args.dir)
    except (ExportError, CheckpointError, RunError) as e:
        print(f"vit-export: error: {e}", file=sys.stderr)
        return 2
    acc = artifact.metadata.get("val_acc1")
    print(f"exported {args.ckpt} ({artifact.config.num_classes} classes"
          + (f", val top-1 {acc:.4f}" if acc is not None else "") + ")", file=sys.stderr)
    print(bento_model.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
