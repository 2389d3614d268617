"""Two readers for pretrained weights that the format list (formats/sources.py) names:

    timm hub name   vit_small_patch16_224.augreg_in21k_ft_in1k, timm/..., hf-hub:timm/... (is_hub_name)
    weight file     a timm / DeiT / torchvision state dict; its architecture named by `arch`
                    (a timm model name), which also gives the preprocessing and class names

Local paths win over names: an existing file or folder is never looked up on the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from vit_service.artifact import ModelArtifact
from vit_service.formats.checkpoints import CheckpointError, load_weights
from vit_service.formats.timm_hub import (
    TimmSource, check_same_function, class_names_from_timm, config_from_timm, create_timm_model, is_timm_name,
    preprocessing_from_timm,
)
from vit_service.model import VisionTransformer
from vit_service.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def is_hub_name(source: str | os.PathLike[str]) -> bool:
    """A string naming a timm hub model and not an existing local path."""
    return isinstance(source, str) and not Path(source).exists() and is_timm_name(source)


def load_weight_file(path: Path, arch: str | None) -> tuple[VisionTransformer, ModelArtifact]:
    """A bare state dict file, built as the timm architecture `arch` (eval mode) + its artifact."""
    if not arch:
        raise CheckpointError(f"{path}: a bare weight file does not say its architecture; add "
                              "--arch with its timm name, e.g. --arch vit_base_patch16_224")
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


__all__ = ["is_hub_name", "load_weight_file"]
