"""Draws a patch-relevance grid over the image it explains: heatmap, crop outline, label and score.

The overlay keeps the uploaded image's aspect ratio. The heatmap covers only the region the model
saw (the eval centre crop); the rest of the image is dimmed. Colours come from matplotlib's
colormaps (perceptually uniform "inferno" by default).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_SIDE, MAX_SIDE = 384, 1024  # small images are scaled up so the caption stays readable


def colorize(grid: np.ndarray, colormap: str = "inferno") -> np.ndarray:
    """(Gh, Gw) floats in [0, 1] -> (Gh, Gw, 3) uint8 RGB."""
    from matplotlib import colormaps  # imported here: only overlays need it

    rgba = colormaps[colormap](np.clip(grid, 0.0, 1.0))  # (Gh, Gw, 4) floats
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def render_overlay(image: Image.Image, grid: np.ndarray, box: tuple[float, float, float, float],
                   caption: str | None = None, alpha: float = 0.55, colormap: str = "inferno") -> Image.Image:
    """The RGB `image` with `grid` blended over `box` (left, top, right, bottom in its pixels)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = min(max(1.0, MIN_SIDE / max(w, h)), MAX_SIDE / max(w, h))
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    base = image.resize((out_w, out_h), Image.Resampling.BICUBIC) if scale != 1.0 else image.copy()
    left, top, right, bottom = (round(v * scale) for v in box)
    left, top = max(0, left), max(0, top)
    right, bottom = min(out_w, max(left + 1, right)), min(out_h, max(top + 1, bottom))

    # Outside the crop the model saw nothing: dim it.
    out = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 0.6)
    region = base.crop((left, top, right, bottom))
    # Bilinear upsampling of the colorised grid: smooth, yet each patch stays where it was.
    heat = Image.fromarray(colorize(grid, colormap)).resize(region.size, Image.Resampling.BILINEAR)
    out.paste(Image.blend(region, heat, alpha), (left, top))
    draw = ImageDraw.Draw(out)
    draw.rectangle((left, top, right - 1, bottom - 1), outline=(255, 255, 255), width=1)
    if caption:
        _draw_caption(draw, caption, out.size)
    return out


def _draw_caption(draw: ImageDraw.ImageDraw, text: str, size: tuple[int, int]) -> None:
    w, h = size
    font = ImageFont.load_default(size=max(12, min(w, h) // 20))
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    pad = 4
    bar = (0, h - (y1 - y0) - 3 * pad, min(w, x1 - x0 + 3 * pad), h)
    draw.rectangle(bar, fill=(0, 0, 0))
    draw.text((bar[0] + pad - x0, bar[1] + pad - y0), text, fill=(255, 255, 255), font=font)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


__all__ = ["colorize", "render_overlay", "png_bytes"]
