"""One entry point for "a pretrained ViT, however the user names it" -> our model + artifact.

    timm hub name         vit_small_patch16_224.augreg_in21k_ft_in1k, timm/..., hf-hub:timm/...
    transformers folder   config.json + model.safetensors (+ preprocessor_config.json)
    exported model        our own model.safetensors + vit_artifact.json
    weight file           a timm / DeiT / torchvision state dict; its architecture named by `arch`
                          (a timm model name), which also gives the preprocessing and class names

Local paths win over names: an existing file or folder is never looked up on the hub.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from vit_service.artifact import ModelArtifact, is_artifact_dir, load_model
from vit_service.formats.checkpoints import CheckpointError, Source, load_weights
from vit_service.formats.timm_hub import (
    HubError, TimmSource, check_same_function, class_names_from_timm, config_from_timm,
    create_timm_model, is_timm_name, load_timm, preprocessing_from_timm, timm_config, timm_weights_path,
)
from vit_service.formats.transformers_vit import (
    config_from_transformers, is_transformers_dir, load_transformers, read_json,
)
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def is_hub_name(source: str | os.PathLike[str]) -> bool:
    """A string naming a timm hub model and not an existing local path."""
    return isinstance(source, str) and not Path(source).exists() and is_timm_name(source)


def load_pretrained(source: str | os.PathLike[str], arch: str | None = None) -> tuple[VisionTransformer, ModelArtifact]:
    """Our model (eval mode) and its artifact from any source listed in the module docstring."""
    path = Path(source)
    if path.is_dir():
        if is_artifact_dir(path):
            return load_model(path)
        if is_transformers_dir(path):
            return load_transformers(path)
        raise CheckpointError(f"{path}: neither an exported model (vit_artifact.json) nor a transformers "
                              "folder (config.json + model.safetensors)")
    if path.is_file():
        if not arch:
            raise CheckpointError(f"{path}: a bare weight file does not say its architecture; add "
                                  "--arch with its timm name, e.g. --arch vit_base_patch16_224")
        return _load_weight_file(path, arch)
    if is_hub_name(str(source)):
        return load_timm(str(source))
    raise CheckpointError(f"{source}: no such file or folder, and not a timm model name "
                          "(e.g. vit_small_patch16_224.augreg_in21k_ft_in1k)")


def _load_weight_file(path: Path, arch: str) -> tuple[VisionTransformer, ModelArtifact]:
    tm = create_timm_model(TimmSource(arch.removeprefix("timm/"), ""))
    config = config_from_timm(tm, arch)
    model = VisionTransformer(config)
    check_same_function(tm, model, arch)
    report = load_weights(model, path)
    preprocessing = preprocessing_from_timm(tm)
    if report.format == "torchvision":
        # torchvision's ViT weights were evaluated with its own transform: 256 -> 224 bilinear, ImageNet stats.
        preprocessing = Preprocessing(image_size=config.image_size, crop_pct=config.image_size / 256,
                                      interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    metadata = {"source": str(path.resolve()), "arch": arch, "loaded": str(report)}
    return model.eval(), ModelArtifact(config, class_names_from_timm(tm), preprocessing, metadata)


def init_config(source: str) -> ViTConfig | None:
    """The architecture a fine-tuning source fixes (timm name or transformers folder), else None."""
    if is_hub_name(source):
        return timm_config(source)
    if is_transformers_dir(source):
        return config_from_transformers(read_json(Path(source) / "config.json"))
    return None


def build_model_config(preset: str, num_classes: int, image_size: int | None,
                       overrides: dict[str, Any] | None, init_from: str | None = None) -> ViTConfig:
    """The one place a training run's ViTConfig is derived from its hyper-parameters.

    A timm hub name or transformers folder in `init_from` fixes the architecture (so it is not
    typed twice); `preset` then goes unused. Training saves the result in every checkpoint, so
    readers only come here for checkpoints written before it did.
    """
    extra: dict[str, Any] = dict(overrides or {})
    if image_size is not None:
        extra["image_size"] = image_size
    base = init_config(init_from) if init_from else None
    if base is not None:
        return replace(base, num_classes=num_classes, **extra)
    return ViTConfig.from_preset(preset, num_classes=num_classes, **extra)


def init_weights_source(source: str) -> Source:
    """What `load_weights` reads for a fine-tuning source: hub names become their cached file,
    transformers folders their tensors under timm's names; anything else is passed through."""
    if is_hub_name(source):
        return timm_weights_path(source)
    if is_transformers_dir(source):
        model, _ = load_transformers(source)
        return model.state_dict()
    return source


__all__ = ["HubError", "load_pretrained", "is_hub_name", "init_config", "init_weights_source", "build_model_config"]
