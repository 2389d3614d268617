"""Serve a pretrained ViT with no training: `vit-export --from NAME_OR_DIR`, a real `bentoml serve`,
real JPEG bytes over HTTP; the served top-k equals timm's (or transformers') own output on that JPEG
with its own preprocessing, to 1e-4 in probability."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import run_cli
from hub_cache import cache_timm_model, hub_env
from service_fixtures import bentoml_server

TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
TOP_K = 5
# fp32: VIT_PRECISION=auto may pick bf16 autocast on CPUs where it is faster (~1e-2 off in probability).
SERVER_ENV = {"VIT_PRECISION": "fp32"}


def jpeg_bytes(seed: int, size: tuple[int, int]) -> bytes:
    """A structured, non-square picture saved as a real JPEG (so resize and crop both matter)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8) // 3 + 60)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, size[0] // 2)), int(rng.integers(0, size[1] // 2))
        draw.ellipse((x0, y0, x0 + size[0] // 3, y0 + size[1] // 3), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def served_top_k(url: str, image: bytes) -> list[dict]:
    r = httpx.post(f"{url}/classify", files={"image": ("x.jpg", image, "image/jpeg")},
                   data={"top_k": str(TOP_K)}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def assert_same_top_k(served: list[dict], probs: torch.Tensor, labels: list[str]) -> None:
    expected = torch.topk(probs, TOP_K)
    assert [p["index"] for p in served] == expected.indices.tolist()
    assert [p["label"] for p in served] == [labels[i] for i in expected.indices.tolist()]
    assert np.allclose([p["score"] for p in served], expected.values.tolist(), atol=1e-4, rtol=0)


@pytest.mark.slow  # a server start (~50 s); loading a timm name from the cache stays fast in test_hub.py
def test_serve_a_timm_name_without_training(tmp_path: Path) -> None:
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    cache = tmp_path / "hub"
    cache.mkdir()
    timm_model = cache_timm_model(cache, TINY, head_scale=30.0)
    env = {**hub_env(cache), "BENTOML_HOME": str(tmp_path / "bentoml")}
    out = run_cli("vit-export", "--from", f"hf-hub:timm/{TINY}", "--name", "vit-classifier", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("vit-classifier:")

    image = jpeg_bytes(0, (300, 200))
    transform = create_transform(**resolve_data_config({}, model=timm_model))  # timm's own eval transform
    with torch.no_grad():
        probs = timm_model(transform(Image.open(io.BytesIO(image)).convert("RGB"))[None]).softmax(-1)[0]
    assert probs.max().item() > 0.05  # peaked enough that the order is decided by the image
    with bentoml_server(tmp_path / "bentoml", tmp_path / "server.log", SERVER_ENV) as url:
        served = served_top_k(url, image)
        info = httpx.get(f"{url}/model_info", timeout=30).json()
    assert_same_top_k(served, probs, ImageNetInfo("imagenet-1k").label_descriptions())
    assert info["class_names"][:2] == ["tench, Tinca tinca", "goldfish, Carassius auratus"]


@pytest.mark.slow  # a second server start (~40 s); the transformers parity itself is in test_transformers_format.py
def test_serve_a_transformers_folder_without_training(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is a dev extra")
    from test_transformers_format import LABELS, save_hf_vit

    hf = save_hf_vit(tmp_path / "hf")
    env = {"BENTOML_HOME": str(tmp_path / "bentoml")}
    out = run_cli("vit-export", "--from", str(tmp_path / "hf"), env=env)
    assert out.returncode == 0, out.stderr[-3000:]

    image = jpeg_bytes(1, (120, 90))
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    with torch.no_grad():
        pixels = processor(images=Image.open(io.BytesIO(image)).convert("RGB"), return_tensors="pt")["pixel_values"]
        probs = hf(pixel_values=pixels).logits.softmax(-1)[0]
    with bentoml_server(tmp_path / "bentoml", tmp_path / "server.log", SERVER_ENV) as url:
        served = served_top_k(url, image)
    assert_same_top_k(served, probs, LABELS)
