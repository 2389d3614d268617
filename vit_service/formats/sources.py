"""Any model the project makes -> (VisionTransformer, ModelArtifact), without Lightning.

A source is an exported model folder (model.safetensors + vit_artifact.json), a `vit-train`
Lightning checkpoint (.ckpt: its hyper-parameters carry preset, classes and preprocessing), or a
BentoML model-store tag (name or name:version).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vit_service.artifact import ArtifactError, ModelArtifact, is_artifact_dir, load_model
from vit_service.formats.checkpoints import CheckpointError, _torch_load, load_weights
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import Preprocessing


class ModelSourceError(ValueError):
    """The named model cannot be found or read; the message names it."""


def load_model_source(source: str, device: str | torch.device = "cpu") -> tuple[VisionTransformer, ModelArtifact]:
    path = Path(source)
    try:
        if path.is_dir():
            if not is_artifact_dir(path):
                raise ModelSourceError(f"{source}: a folder, but not an exported model "
                                       "(expected model.safetensors and vit_artifact.json)")
            return load_model(path, device)
        if path.is_file():
            return _from_lightning_checkpoint(path, device)
    except (ArtifactError, CheckpointError) as e:
        raise ModelSourceError(str(e)) from None
    if path.suffix in (".ckpt", ".pt", ".pth", ".safetensors") or "/" in source:
        raise ModelSourceError(f"{source}: no such file or folder")
    return _from_bentoml_store(source, device)


def _from_lightning_checkpoint(path: Path, device: str | torch.device) -> tuple[VisionTransformer, ModelArtifact]:
    ckpt = _torch_load(path)
    hp: dict[str, Any] = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    missing = [k for k in ("preset", "num_classes", "class_names", "preprocessing") if not hp.get(k)]
    if missing:
        raise ModelSourceError(f"{path}: not a vit-train checkpoint (its hyper-parameters lack {missing})")
    # As training.module.build_model_config, which this package cannot import (it is Lightning's side).
    overrides = dict(hp.get("model_overrides") or {})
    if hp.get("image_size") is not None:
        overrides["image_size"] = hp["image_size"]
    config = ViTConfig.from_preset(hp["preset"], num_classes=hp["num_classes"], **overrides)
    model = VisionTransformer(config)
    load_weights(model, ckpt)
    artifact = ModelArtifact(config, list(hp["class_names"]), Preprocessing.from_dict(hp["preprocessing"]),
                             {"source_checkpoint": str(path)})
    return model.to(device).eval(), artifact


def _from_bentoml_store(tag: str, device: str | torch.device) -> tuple[VisionTransformer, ModelArtifact]:
    import bentoml  # only for tags: folders and checkpoints load without it

    try:
        bento_model = bentoml.models.get(tag)
    except Exception as e:  # NotFound, bad tag syntax, ...
        raise ModelSourceError(f"{tag}: not a file, a folder or a model in the BentoML store "
                               f"({type(e).__name__}: {e})") from None
    try:
        return load_model(bento_model.path, device)
    except ArtifactError as e:
        raise ModelSourceError(f"{tag}: {e}") from None


__all__ = ["load_model_source", "ModelSourceError"]
