"""POST /explain on the front: decode the upload, ask the model service for the attention map,
answer JSON (top-k labels + patch grid) or the overlay PNG.

The map is computed in its own single thread, never in the batch queue that serves /classify: in
the front process in in-process mode, by the model service's `explain` API in split mode.
Decoding and overlay rendering run in the front's decoding threads, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import numpy as np
from PIL import Image

from vit_service.explain import METHODS, crop_box
from vit_service.inference import top_k_predictions
from vit_service.preprocessing import InvalidImageError, decode_image
from vit_service.serving.uploads import RequestError

logger = logging.getLogger("bentoml.vit_service")
METHOD_FIELD, CLASS_FIELD, FORMAT_FIELD = "method", "class_name", "format"
EXPLAIN_FIELDS = (METHOD_FIELD, CLASS_FIELD, FORMAT_FIELD)
FORMATS = ("json", "png")
DEFAULT_TOP_K = 5


def plain_value(value: str | None) -> str | None:
    """A text form value; None when absent, empty or `null` (BentoML's client sends unset
    arguments as `null`, and JSON-encodes strings: '"png"' -> 'png')."""
    if value is None:
        return None
    text = value.strip()
    with contextlib.suppress(ValueError):
        decoded = json.loads(text)
        if decoded is None:
            return None
        text = decoded.strip() if isinstance(decoded, str) else text
    return text or None


def choice(value: str | None, choices: tuple[str, ...], field: str, default: str) -> str:
    text = plain_value(value)
    if text is None:
        return default
    if text not in choices:
        raise RequestError(400, f"'{field}' must be one of {', '.join(choices)}; got {text[:40]!r}", "bad_option")
    return text


async def explain_upload(svc: Any, name: str, data: bytes, top_k: int | None, method: str | None,
                         class_name: str | None, fmt: str | None) -> dict[str, Any] | bytes:
    """The /explain answer for one uploaded file; raises RequestError for the client's mistakes."""
    info = await svc.describe()
    class_names: list[str] = info["class_names"]
    method = choice(method, METHODS, METHOD_FIELD, "rollout")
    fmt = choice(fmt, FORMATS, FORMAT_FIELD, "json")
    k = min(DEFAULT_TOP_K, len(class_names)) if top_k is None else top_k
    if not 1 <= k <= len(class_names):
        raise RequestError(400, f"top_k must be between 1 and {len(class_names)} (the number of classes), got {k}")
    wanted = plain_value(class_name)
    if wanted is not None and wanted not in class_names:
        shown = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
        raise RequestError(400, f"unknown '{CLASS_FIELD}' {wanted[:60]!r}; the model's classes are: {shown}", "bad_option")
    class_index = None if wanted is None else class_names.index(wanted)

    loop = asyncio.get_running_loop()
    try:
        image, pixels = await loop.run_in_executor(svc.decode_pool, _decode, svc, name, data)
    except InvalidImageError as e:
        raise RequestError(400, str(e)) from None
    result = await _call_model(svc, pixels[None], method, class_index)
    probs = np.asarray(result["probs"], dtype=np.float32)  # (K,)
    grid = np.asarray(result["grid"], dtype=np.float32)  # (Gh, Gw)
    explained = int(result["class_index"])
    box = crop_box(svc._preprocessing, *image.size)
    if fmt == "png":
        from vit_service.overlay import png_bytes, render_overlay

        caption = f"{class_names[explained]} {probs[explained]:.2f} ({method})"
        return await loop.run_in_executor(svc.decode_pool, lambda: png_bytes(render_overlay(image, grid, box, caption)))
    return {
        "predictions": top_k_predictions(probs, class_names, k),
        "method": method,
        "explained_class": class_names[explained],
        "grid_shape": list(grid.shape),
        "grid": np.round(grid, 4).tolist(),
        "crop_box": [round(v, 2) for v in box],  # (left, top, right, bottom) of the crop in the upload's pixels
        "image_size": list(image.size),
    }


def _decode(svc: Any, name: str, data: bytes) -> tuple[Image.Image, np.ndarray]:
    """Encoded image -> (RGB image, (3, S, S) uint8), decoded exactly as /classify decodes."""
    pre = svc._preprocessing
    settings = svc.settings
    try:
        image = decode_image(data, settings.max_image_pixels,
                             draft_size=pre.resize_size if settings.jpeg_draft else None)
    except InvalidImageError as e:
        raise InvalidImageError(f"{name or 'upload'}: {e}") from None
    return image, pre.to_uint8(image).numpy()


async def _call_model(svc: Any, pixels: np.ndarray, method: str, class_index: int | None) -> dict[str, Any]:
    from bentoml.exceptions import BentoMLException

    if getattr(svc, "explainer", None) is not None:  # in-process mode: the model is in this process
        loop = asyncio.get_running_loop()
        probs, target, maps = await loop.run_in_executor(
            svc.explain_pool, svc.explainer.explain_uint8, pixels, method, class_index)
        return {"probs": probs[0], "class_index": int(target[0]), "grid": maps[0]}
    try:
        return await svc.model.to_async.explain(pixels, method=method, class_index=class_index)
    except BentoMLException as e:
        logger.warning("explain call failed: %r", e)
        if int(e.error_code) == 504:
            raise RequestError(504, "the model did not answer in time") from None
        raise RequestError(503, "the model service could not explain this image now; retry shortly") from None
    except TimeoutError:
        raise RequestError(504, "the model did not answer in time") from None
