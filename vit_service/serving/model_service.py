"""Split mode's model service: the model on its device behind one adaptive-batching API.

The front (service.py) calls it through `bentoml.depends` (model_handle.RemoteModel); each runs
in its own worker processes, and only uint8 pixels cross between them.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Optional

import bentoml
import numpy as np
from bentoml.validators import DType

from vit_service.serving import metrics
from vit_service.serving.bentoml_compat import fold_unknown_paths, label_metrics_with_model
from vit_service.serving.local_model import describe_model, load_predictor, make_explainer, warm_up
from vit_service.serving.settings import current_settings

SETTINGS = current_settings()


@bentoml.service(name="vit_model", traffic={"timeout": SETTINGS.timeout}, workers=1)
class ViTModel:
    """Split mode: the model on its device, behind one adaptive-batching API."""

    bento_model = bentoml.models.BentoModel(SETTINGS.model_tag)  # at class scope: `bentoml build` packs it

    def __init__(self) -> None:
        self.ready = False
        label_metrics_with_model(self.bento_model.tag)
        self.predictor = load_predictor(SETTINGS, self.bento_model.path)
        warm_up(self.predictor, SETTINGS, self.bento_model.tag)
        # /explain runs here, one at a time in its own thread: never in the batch queue, and
        # never more than one core's worth of work taken from /classify's forward passes.
        self.explainer = make_explainer(self.predictor, self.bento_model.path)
        self.explain_pool = ThreadPoolExecutor(1, thread_name_prefix="explain")
        self.ready = True

    def __is_ready__(self) -> bool:
        return self.ready

    @bentoml.api(batchable=SETTINGS.batching, batch_dim=0, max_batch_size=SETTINGS.max_batch_size,
                 max_latency_ms=SETTINGS.max_latency_ms)
    def predict(self, images: Annotated[np.ndarray, DType("uint8")]) -> np.ndarray:
        """(B, 3, S, S) uint8 images, resized and cropped -> (B, num_classes) float32 probabilities."""
        start = time.perf_counter()
        try:
            probs = self.predictor.predict_proba(images)
        except ValueError as e:
            raise bentoml.exceptions.InvalidArgument(str(e)) from None
        metrics.stage_seconds.labels(stage="forward").observe(time.perf_counter() - start)
        metrics.batch_size.observe(len(images))
        return probs

    @bentoml.api
    async def explain(self, pixels: Annotated[np.ndarray, DType("uint8")], method: str = "rollout",
                      class_index: Optional[int] = None) -> dict[str, Any]:
        """(1, 3, S, S) uint8 -> probabilities, the explained class and the (Gh, Gw) map in [0, 1]."""
        loop = asyncio.get_running_loop()
        try:
            probs, target, maps = await loop.run_in_executor(
                self.explain_pool, self.explainer.explain_uint8, pixels, method, class_index)
        except ValueError as e:
            raise bentoml.exceptions.InvalidArgument(str(e)) from None
        return {"probs": probs[0].tolist(), "class_index": int(target[0]), "grid": maps[0].tolist()}

    @bentoml.api
    def info(self) -> dict[str, Any]:
        return describe_model(self.predictor, SETTINGS, self.bento_model.tag)


fold_unknown_paths({api.route for api in ViTModel.apis.values()})  # the rest: one metrics label
