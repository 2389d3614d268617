"""Draws a patch-relevance grid over the image it explains: heatmap, crop outline, label and score,
and a legend strip below it (the colour bar over the grid's range).

The image above the legend keeps the uploaded image's aspect ratio. The heatmap covers only the
region the model saw (the eval centre crop); the rest of the image is dimmed. Its opacity follows
the relevance: where the grid is 0 the image shows as it is, where it is 1 the colour is `alpha`
opaque. Colours come from matplotlib's colormaps (perceptually uniform "inferno" by default).
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


def legend_height(width: int) -> int:
    """Height in pixels of the legend strip under an overlay `width` pixels wide."""
    return 3 * _legend_font_size(width)


def _legend_font_size(width: int) -> int:
    return max(12, width // 32)


def render_overlay(image: Image.Image, grid: np.ndarray, box: tuple[float, float, float, float],
                   caption: str | None = None, alpha: float = 0.7, colormap: str = "inferno") -> Image.Image:
    """The RGB `image` with `grid` blended over `box` (left, top, right, bottom in its pixels),
    opacity `alpha` times the relevance, and the legend strip below."""
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
    # Bilinear upsampling of the grid: smooth, yet each patch stays where it was.
    relevance = np.clip(np.asarray(Image.fromarray(np.asarray(grid, dtype=np.float32)).resize(
        region.size, Image.Resampling.BILINEAR)), 0.0, 1.0)  # (h, w) in [0, 1]
    opacity = alpha * relevance[..., None]  # (h, w, 1): none where the grid is 0
    blended = np.asarray(region, dtype=np.float32) * (1 - opacity) + colorize(relevance, colormap) * opacity
    out.paste(Image.fromarray((blended + 0.5).astype(np.uint8)), (left, top))
    draw = ImageDraw.Draw(out)
    draw.rectangle((left, top, right - 1, bottom - 1), outline=(255, 255, 255), width=1)
    if caption:
        _draw_caption(draw, caption, out.size)
    framed = Image.new("RGB", (out_w, out_h + legend_height(out_w)), (0, 0, 0))
    framed.paste(out, (0, 0))
    _draw_legend(framed, out_h, float(np.min(grid)), float(np.max(grid)), colormap)
    return framed


def _draw_legend(image: Image.Image, top: int, lo: float, hi: float, colormap: str) -> None:
    """The colour bar over [lo, hi] (the grid's range) in the strip from row `top` down, labelled."""
    w = image.width
    size = _legend_font_size(w)
    pad = size // 2
    values = np.linspace(np.clip(lo, 0, 1), np.clip(hi, 0, 1), max(1, w - 2 * pad))[None, :]  # (1, bar width)
    bar = Image.fromarray(colorize(values, colormap)).resize((values.shape[1], size), Image.Resampling.NEAREST)
    image.paste(bar, (pad, top + pad // 2))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(10, size * 3 // 4))
    y = top + pad // 2 + size + 2
    for text, anchor, x in ((f"{lo:.2f}", "la", pad), ("attention", "ma", w // 2), (f"{hi:.2f}", "ra", w - pad)):
        draw.text((x, y), text, fill=(255, 255, 255), font=font, anchor=anchor)


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


__all__ = ["colorize", "render_overlay", "legend_height", "png_bytes"]
