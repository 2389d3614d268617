"""Saving to and reading from the BentoML model store (BENTOML_HOME, default ~/bentoml)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml

from vit_service.artifact import ModelArtifact
from vit_service.model import VisionTransformer

DEFAULT_MODEL_TAG = "vit-classifier:latest"


def save_to_bentoml(name: str, model: VisionTransformer, artifact: ModelArtifact,
                    labels: dict[str, str] | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> bentoml.Model:
    """Creates a new version of BentoML model `name` holding the artifact; returns it (`.tag`).

    `write_extra(folder)` adds more files (e.g. model.onnx) before the model is committed."""
    metadata: dict[str, Any] = {
        "num_classes": artifact.config.num_classes,
        "image_size": artifact.preprocessing.image_size,
        **{k: v for k, v in artifact.metadata.items() if isinstance(v, (str, int, float, bool))},
    }
    with bentoml.models.create(name, labels=labels or {}, metadata=metadata, module="vit_service") as bento_model:
        artifact.save(model, bento_model.path)
        if write_extra:
            write_extra(Path(bento_model.path))
    return bento_model
