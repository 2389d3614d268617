"""Hugging Face transformers ViT folders load with output parity, and our export loads in transformers.

transformers is the oracle (a dev dependency); the project code reads the folders without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers", reason="transformers is a dev extra: pip install -e '.[dev]'")

from vit_service.formats.transformers_vit import (  # noqa: E402
    TransformersFormatError, load_transformers, save_transformers_folder,
)
from vit_service.model import VisionTransformer  # noqa: E402
from vit_service.preprocessing import open_image  # noqa: E402

LABELS = ["cat", "dog", "bird", "fish", "frog"]


def jpeg_file(path: Path, size: tuple[int, int] = (120, 90), seed: int = 0) -> Path:
    """A real (non-square) JPEG with some structure, so resizing and cropping matter."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 / w, y * 255 / h, (x + y) % 64 * 4], axis=-1) + rng.normal(0, 20, (h, w, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
    return path


def save_hf_vit(directory: Path, head: bool = True, **overrides) -> torch.nn.Module:
    """A small randomly initialised transformers ViT (HF's defaults: layer_norm_eps 1e-12) + processor."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=64,
        patch_size=16, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
        **overrides)
    cls = transformers.ViTForImageClassification if head else transformers.ViTModel
    model = cls(cfg).eval()
    with torch.no_grad():  # trained-like logit spread, so a wrong mapping cannot hide in small numbers
        for p in model.parameters():
            p.mul_(5.0) if p.ndim > 1 else None
    model.save_pretrained(directory)
    transformers.ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return model


def hf_pixels(directory: Path, image_path: Path) -> torch.Tensor:
    # The PIL backend: the one HF ViT checkpoints were evaluated with (and the one serving uses).
    proc = transformers.AutoImageProcessor.from_pretrained(directory, backend="pil")
    return proc(images=Image.open(image_path).convert("RGB"), return_tensors="pt")["pixel_values"]


def test_classification_folder_loads_with_logit_parity(tmp_path: Path) -> None:
    hf = save_hf_vit(tmp_path / "hf")
    model, artifact = load_transformers(tmp_path / "hf")
    image = jpeg_file(tmp_path / "x.jpg")
    pixels = hf_pixels(tmp_path / "hf", image)
    ours = artifact.preprocessing(open_image(image))[None]  # (1, 3, 64, 64)
    assert (ours - pixels).abs().max().item() < 1e-5
    with torch.no_grad():
        expected, got = hf(pixel_values=pixels).logits, model(ours)
    assert expected.abs().max().item() > 1.0
    assert (expected - got).abs().max().item() <= 1e-4
    assert artifact.class_names == LABELS
    p = artifact.preprocessing
    assert (p.image_size, p.crop_mode, p.interpolation, p.mean) == (64, "squash", "bilinear", (0.5, 0.5, 0.5))
    assert model.config.norm_eps == 1e-12


def test_vit_model_folder_loads_as_a_headless_backbone(tmp_path: Path) -> None:
    hf = save_hf_vit(tmp_path / "base", head=False)
    model, artifact = load_transformers(tmp_path / "base")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (hf(pixel_values=x).last_hidden_state - model.forward_features(x)).abs().max().item() <= 1e-4
    assert model.config.num_classes == 0 and artifact.class_names == []


def test_our_model_written_as_transformers_folder_loads_with_same_outputs(tmp_path: Path) -> None:
    save_hf_vit(tmp_path / "hf")
    model, artifact = load_transformers(tmp_path / "hf")
    save_transformers_folder(model, artifact, tmp_path / "out")
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    image = jpeg_file(tmp_path / "x.jpg", seed=1)
    pixels = hf_pixels(tmp_path / "out", image)
    with torch.no_grad():
        assert (back(pixel_values=pixels).logits - model(pixels)).abs().max().item() <= 1e-4
    assert back.config.id2label == dict(enumerate(LABELS))
    # and it reads back into ours unchanged
    again, again_artifact = load_transformers(tmp_path / "out")
    assert again_artifact.preprocessing == artifact.preprocessing
    assert torch.equal(again(pixels), model(pixels))


def test_writing_what_transformers_cannot_express_is_a_clear_error(tmp_path: Path) -> None:
    from vit_service.artifact import ModelArtifact
    from vit_service.model import ViTConfig
    from vit_service.preprocessing import Preprocessing

    config = ViTConfig(image_size=32, patch_size=8, num_classes=2, embed_dim=32, depth=1, num_heads=2, global_pool="avg")
    artifact = ModelArtifact(config, ["a", "b"], Preprocessing(image_size=32), {})
    with pytest.raises(TransformersFormatError, match="average pooling"):
        save_transformers_folder(VisionTransformer(config), artifact, tmp_path / "out")


def test_other_model_types_are_refused_by_name(tmp_path: Path) -> None:
    d = tmp_path / "deit"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "deit", "architectures": ["DeiTForImageClassification"]}))
    with pytest.raises(TransformersFormatError, match="model_type 'deit' is not a plain ViT"):
        load_transformers(d)


def test_init_from_a_transformers_folder_sets_the_architecture_and_loads_its_weights(tmp_path: Path) -> None:
    from training.module import ViTClassifier

    save_hf_vit(tmp_path / "hf")
    module = ViTClassifier(preset="vit_base_patch16_224", num_classes=3, image_size=32, init_from=str(tmp_path / "hf"))
    c = module.model.config
    assert (c.embed_dim, c.depth, c.num_classes, c.image_size, c.norm_eps) == (64, 2, 3, 32, 1e-12)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))  # the folder as transformers wrote it
    hf_qkv = torch.cat([saved[f"vit.encoder.layer.1.attention.attention.{n}.weight"] for n in ("query", "key", "value")])
    assert torch.equal(module.model.blocks[1].attn.qkv.weight, hf_qkv)
