"""Request validation shared by every upload route: form values, `top_k`, class names, image decoding.

Each check raises `RequestError` with a 4xx, a message that names the fix and a metric reason,
so /classify, /classify_batch and /explain answer the same mistake the same way.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import numpy as np
from PIL import Image

from vit_service.predictions import classes_preview
from vit_service.preprocessing import InvalidImageError, Preprocessing, decode_image
from vit_service.serving.errors import RequestError

TOP_K_FIELD = "top_k"
DEFAULT_TOP_K = 5


def _unquote(value: str) -> str | None:
    """Stripped text, JSON-decoded where it is JSON: '"png"' -> 'png', 'null' -> None (BentoML's
    client JSON-encodes form values and sends unset arguments as `null`); other text as it is."""
    text = value.strip()
    with contextlib.suppress(ValueError):
        decoded = json.loads(text)
        if decoded is None:
            return None
        if isinstance(decoded, str):
            return decoded.strip()
    return text


def form_value(value: str | None) -> str | None:
    """A text form value; None when absent, empty or `null`."""
    return None if value is None else (_unquote(value) or None)


def parse_top_k(values: list[Any]) -> int | None:
    """The `top_k` form field or query parameter as an int; None when not given (or `null`)."""
    values = [v for v in values if not (isinstance(v, str) and v.strip() == "null")]
    if not values:
        return None
    if len(values) > 1:
        raise RequestError(400, f"'{TOP_K_FIELD}' given {len(values)} times; give it once", "bad_top_k")
    if not isinstance(values[0], str):
        raise RequestError(400, f"'{TOP_K_FIELD}' must be a plain form value, not a file", "bad_top_k")
    text = _unquote(values[0]) or ""
    # Plain ASCII digits only: Python's int() also takes "1_000" and other scripts' digits,
    # which BentoML's own validation behind us would refuse with a 400 of another shape.
    if not re.fullmatch(r"-?[0-9]+", text):
        raise RequestError(400, f"'{TOP_K_FIELD}' must be an integer, got {text[:40]!r}", "bad_top_k")
    return int(text)


def top_k_or_default(top_k: int | None, class_names: list[str]) -> int:
    """`top_k` checked against the model's classes; by default 5, at most the number of classes."""
    k = min(DEFAULT_TOP_K, len(class_names)) if top_k is None else top_k
    if not 1 <= k <= len(class_names):
        raise RequestError(400, f"top_k must be between 1 and {len(class_names)} (the number of classes), got {k}",
                           "bad_top_k")
    return k


def choice(value: str | None, choices: tuple[str, ...], field: str, default: str) -> str:
    """A form value that must be one of `choices`; `default` when not given."""
    text = form_value(value)
    if text is None:
        return default
    if text not in choices:
        raise RequestError(400, f"'{field}' must be one of {', '.join(choices)}; got {text[:40]!r}", "bad_option")
    return text


def class_index(value: str | None, field: str, class_names: list[str]) -> int | None:
    """The index of the class named by a form value; None when not given."""
    wanted = form_value(value)
    if wanted is None:
        return None
    if wanted not in class_names:
        raise RequestError(400, f"unknown '{field}' {wanted[:60]!r}; the model's classes are: "
                                f"{classes_preview(class_names)}", "bad_option")
    return class_names.index(wanted)


def decode_upload(name: str, data: bytes, preprocessing: Preprocessing, max_pixels: int,
                  jpeg_draft: bool) -> tuple[Image.Image, np.ndarray]:
    """Encoded upload -> (RGB image, (3, S, S) uint8 as the model sees it); a bad image is a 400
    naming the file. Runs in a decoding thread (Pillow releases the GIL)."""
    try:
        image = decode_image(data, max_pixels, draft_size=preprocessing.resize_size if jpeg_draft else None)
    except InvalidImageError as e:
        raise RequestError(400, f"{name or 'upload'}: {e}", "bad_image") from None
    return image, preprocessing.to_uint8(image).numpy()
