"""Probabilities as answers: the top-k list every route and CLI returns, and class names in errors."""

from __future__ import annotations

from typing import Any

import numpy as np


def top_k_predictions(probs: np.ndarray, class_names: list[str], k: int) -> list[dict[str, Any]]:
    """(K,) probabilities -> the k most likely classes, highest first."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": class_names[i], "index": int(i), "score": float(probs[i])} for i in order]


def classes_preview(class_names: list[str], shown: int = 20) -> str:
    """The first `shown` class names, for an error about an unknown class."""
    return ", ".join(class_names[:shown]) + (" ..." if len(class_names) > shown else "")


__all__ = ["classes_preview", "top_k_predictions"]
