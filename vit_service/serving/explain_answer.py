"""The /explain answer: top-k labels and the patch grid as JSON, or the overlay PNG.

The map itself comes from the model handle (its own thread, never the batch queue that serves
/classify); this shapes it for the client. Runs in a decoding thread (the overlay is rendered).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from vit_service.predictions import top_k_predictions
from vit_service.preprocessing import Preprocessing

METHOD_FIELD, CLASS_FIELD, FORMAT_FIELD = "method", "class_name", "format"
EXPLAIN_FIELDS = (METHOD_FIELD, CLASS_FIELD, FORMAT_FIELD)
FORMATS = ("json", "png")


def explain_answer(image: Image.Image, probs: np.ndarray, grid: np.ndarray, explained: int, class_names: list[str],
                   preprocessing: Preprocessing, k: int, method: str, fmt: str) -> dict[str, Any] | bytes:
    """`probs` (K,), `grid` (Gh, Gw) over the crop the model saw -> JSON body, or PNG bytes."""
    box = preprocessing.crop_box(*image.size)
    if fmt == "png":
        from vit_service.overlay import png_bytes, render_overlay

        caption = f"{class_names[explained]} {probs[explained]:.2f} ({method})"
        return png_bytes(render_overlay(image, grid, box, caption))
    return {
        "predictions": top_k_predictions(probs, class_names, k),
        "method": method,
        "explained_class": class_names[explained],
        "grid_shape": list(grid.shape),
        "grid": np.round(grid, 4).tolist(),
        "crop_box": [round(v, 2) for v in box],  # (left, top, right, bottom) of the crop in the upload's pixels
        "image_size": list(image.size),
    }
