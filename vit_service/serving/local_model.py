"""The model in this process: load it with the settings, warm it up, describe it, explain with it.

Used by both places the model can run: the front process (in-process mode, model_handle.py) and
the split-mode model service (model_service.py).
"""

from __future__ import annotations

import logging
from typing import Any

from vit_service.predictor import ImagePredictor
from vit_service.serving.settings import Settings

logger = logging.getLogger("bentoml.vit_service")


def load_predictor(settings: Settings, model_path: str) -> ImagePredictor:
    """The exported model on its device (not yet warmed up: `warm_up` does that), with the
    configured torch threads and backend."""
    from vit_service.backend import load_backend

    threads = settings.model_threads  # the rule in settings.py: decode + model threads <= cores
    if threads:
        import torch

        torch.set_num_threads(threads)
    return load_backend(model_path, backend=settings.backend, device=settings.device, precision=settings.precision,
                        compile_mode=settings.compile_mode, threads=threads)


def warm_up(predictor: ImagePredictor, settings: Settings, tag: Any) -> None:
    seconds = predictor.warmup(settings.max_batch_size)
    logger.info("model %s ready on %s in %.1f s", tag, predictor.describe(), seconds)


def make_explainer(predictor: ImagePredictor, model_path: str) -> Any:
    """The /explain engine. Attention maps need the torch model (its attention and gradients), so
    when onnxruntime serves /classify (VIT_BACKEND) the torch model is loaded beside it."""
    from vit_service.artifact import load_model
    from vit_service.explain import Explainer

    model = getattr(predictor, "model", None)
    if model is None:
        model, _ = load_model(model_path)
        return Explainer(model, predictor.artifact, "cpu")  # onnxruntime runs on CPU-only hosts
    return Explainer(model, predictor.artifact, getattr(predictor, "device", "cpu"))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def describe_model(predictor: ImagePredictor, settings: Settings, tag: Any) -> dict[str, Any]:
    """What the front needs to prepare inputs and label outputs, and what /model_info shows."""
    artifact = predictor.artifact
    S = artifact.preprocessing.image_size
    return {
        "model_tag": str(tag),
        "class_names": list(artifact.class_names),
        "num_classes": len(artifact.class_names),
        "input_size": [3, S, S],
        "preprocessing": artifact.preprocessing.to_dict(),
        "model_config": artifact.config.to_dict(),
        # Keys starting with "_" (e.g. Lightning's "_instantiator") are internal.
        "metadata": {k: v for k, v in artifact.metadata.items() if not str(k).startswith("_")},
        # torch_threads: the intra-op threads torch really uses in this process (VIT_TORCH_THREADS).
        "serving": {**predictor.describe(), "torch_threads": _torch_threads(), "batching": settings.batching,
                    "max_batch_size": settings.max_batch_size, "max_latency_ms": settings.max_latency_ms},
    }
