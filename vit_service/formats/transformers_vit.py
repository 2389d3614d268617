"""Hugging Face transformers ViT folders <-> our VisionTransformer, both ways.

A `ViTForImageClassification` or `ViTModel` folder (config.json + model.safetensors, optionally
preprocessor_config.json: the layout of google/vit-base-patch16-224) loads with its `id2label` as
class names and its image processor settings as our preprocessing; `save_transformers_folder`
writes the reverse, a folder `ViTForImageClassification.from_pretrained` reads.

Plain JSON + safetensors: transformers itself is never imported (it is a test dependency only,
the oracle in tests/test_transformers_format.py). HF's layer names differ from timm's; the one
structural difference is attention: HF keeps query, key and value as three Linear layers, timm one
fused `qkv` (concatenated in q, k, v order).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vit_service.artifact import ModelArtifact, save_safetensors
from vit_service.formats.checkpoints import CheckpointError, load_weights, rename_key
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import Preprocessing

CONFIG_FILE, WEIGHTS_FILE, PROCESSOR_FILE = "config.json", "model.safetensors", "preprocessor_config.json"
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values

# HF ViT name (without the `vit.` prefix) -> timm name; first match wins.
_HF_TO_TIMM = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_IGNORED = re.compile(r"^(pooler\.|embeddings\.mask_token$)")  # ViTModel's pooler, MIM mask token: unused


class TransformersFormatError(CheckpointError):
    """A folder that is not a ViT transformers model this project can read or write."""


def is_transformers_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    if not (p.is_dir() and (p / CONFIG_FILE).is_file()):
        return False
    try:
        return "model_type" in json.loads((p / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, OSError):
        return False


def config_from_transformers(hf: dict[str, Any], where: str = CONFIG_FILE) -> ViTConfig:
    if hf.get("model_type") != "vit":
        raise TransformersFormatError(f"{where}: model_type {hf.get('model_type')!r} is not a plain ViT ('vit')")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise TransformersFormatError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only exact 'gelu')")
    D, heads = hf.get("hidden_size", 768), hf.get("num_attention_heads", 12)
    architectures = hf.get("architectures") or ["ViTForImageClassification"]
    has_head = "ViTForImageClassification" in architectures
    id2label = hf.get("id2label") or {}
    return ViTConfig(
        image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 16),
        in_chans=hf.get("num_channels", 3), num_classes=len(id2label) if has_head else 0,
        embed_dim=D, depth=hf.get("num_hidden_layers", 12), num_heads=heads,
        mlp_ratio=hf.get("intermediate_size", 4 * D) / D, qkv_bias=hf.get("qkv_bias", True),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
    )


def state_dict_from_transformers(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViT tensors (with or without the `vit.` prefix) -> timm names; q, k, v fused into qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in hf_state.items():
        k = key.removeprefix("vit.")
        if _IGNORED.match(k):
            continue
        m = _QKV.match(k)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        out[rename_key(k, _HF_TO_TIMM)] = value
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise TransformersFormatError(f"layer {layer}: incomplete attention {kind} ({sorted(parts)})")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])  # (3D, ...)
    return out


def state_dict_to_transformers(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our (timm-named) tensors -> ViTForImageClassification's names; qkv split into q, k, v."""
    out: dict[str, torch.Tensor] = {
        "vit.embeddings.cls_token": state["cls_token"],
        "vit.embeddings.position_embeddings": state["pos_embed"],
        "vit.layernorm.weight": state["norm.weight"],
        "vit.layernorm.bias": state["norm.bias"],
        "classifier.weight": state["head.weight"],
        "classifier.bias": state["head.bias"],
    }
    for kind in ("weight", "bias"):
        out[f"vit.embeddings.patch_embeddings.projection.{kind}"] = state[f"patch_embed.proj.{kind}"]
    for i in range(depth):
        b, h = f"blocks.{i}.", f"vit.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[h + f"layernorm_before.{kind}"] = state[b + f"norm1.{kind}"]
            out[h + f"layernorm_after.{kind}"] = state[b + f"norm2.{kind}"]
            out[h + f"attention.output.dense.{kind}"] = state[b + f"attn.proj.{kind}"]
            out[h + f"intermediate.dense.{kind}"] = state[b + f"mlp.fc1.{kind}"]
            out[h + f"output.dense.{kind}"] = state[b + f"mlp.fc2.{kind}"]
            if b + f"attn.qkv.{kind}" in state:
                q, k, v = state[b + f"attn.qkv.{kind}"].chunk(3)  # 3 x (D, ...)
                for name, t in zip(("query", "key", "value"), (q, k, v)):
                    out[h + f"attention.attention.{name}.{kind}"] = t
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def preprocessing_from_transformers(proc: dict[str, Any], config: ViTConfig, where: str = PROCESSOR_FILE) -> Preprocessing:
    """An image processor's settings (ViTImageProcessor or one with a centre crop) as our Preprocessing."""
    if not proc:  # no preprocessor_config.json: ViTImageProcessor's defaults
        proc = {"size": {"height": config.image_size, "width": config.image_size}, "resample": 2,
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    if proc.get("do_rescale", True) and abs(proc.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise TransformersFormatError(f"{where}: rescale_factor {proc['rescale_factor']} is not 1/255")
    size = proc.get("size", {"height": config.image_size, "width": config.image_size})
    size = {"height": size, "width": size} if isinstance(size, int) else size
    resample = _PIL_RESAMPLE.get(proc.get("resample", 2))
    if resample is None:
        raise TransformersFormatError(f"{where}: resample {proc.get('resample')!r} is not supported")
    mean, std = (proc.get("image_mean", [0.5] * 3), proc.get("image_std", [0.5] * 3)) if proc.get("do_normalize", True) \
        else ([0.0] * 3, [1.0] * 3)
    if proc.get("do_center_crop") and "shortest_edge" in size:
        crop = proc.get("crop_size", {})
        crop = crop if isinstance(crop, int) else crop.get("height", config.image_size)
        return Preprocessing(image_size=crop, crop_pct=crop / size["shortest_edge"], interpolation=resample,
                             mean=tuple(mean), std=tuple(std), crop_mode="center")
    if proc.get("crop_pct") and size.get("shortest_edge", 384) < 384:  # ConvNextImageProcessor
        return Preprocessing(image_size=size["shortest_edge"], crop_pct=proc["crop_pct"], interpolation=resample,
                             mean=tuple(mean), std=tuple(std), crop_mode="center")
    if proc.get("do_resize", True) and size.get("height") == size.get("width") and not proc.get("do_center_crop"):
        # ViTImageProcessor: both sides straight to `size`, no crop.
        return Preprocessing(image_size=size["height"], crop_pct=1.0, interpolation=resample,
                             mean=tuple(mean), std=tuple(std), crop_mode="squash")
    raise TransformersFormatError(f"{where}: unsupported resize/crop settings (size {size}, "
                                  f"do_resize {proc.get('do_resize', True)}, do_center_crop {proc.get('do_center_crop')})")


def load_transformers(directory: str | os.PathLike[str]) -> tuple[VisionTransformer, ModelArtifact]:
    """A transformers ViT folder -> our model (eval mode) and its artifact description."""
    d = Path(directory)
    hf = read_json(d / CONFIG_FILE)
    config = config_from_transformers(hf, str(d / CONFIG_FILE))
    weights = d / WEIGHTS_FILE
    if weights.is_file():
        hf_state = load_file(str(weights))
    elif (d / "pytorch_model.bin").is_file():
        hf_state = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise TransformersFormatError(f"{d}: no {WEIGHTS_FILE} or pytorch_model.bin")
    model = VisionTransformer(config)
    report = load_weights(model, state_dict_from_transformers(hf_state))
    id2label = hf.get("id2label") or {}
    class_names = [id2label.get(str(i), id2label.get(i, f"class_{i}")) for i in range(config.num_classes)]
    proc_path = d / PROCESSOR_FILE
    proc = read_json(proc_path) if proc_path.is_file() else {}
    preprocessing = preprocessing_from_transformers(proc, config, str(proc_path))
    metadata = {"source": str(d.resolve()), "format": "transformers",
                "architectures": hf.get("architectures"), "loaded": str(report)}
    return model.eval(), ModelArtifact(config, class_names, preprocessing, metadata)


def save_transformers_folder(model: VisionTransformer, artifact: ModelArtifact,
                             directory: str | os.PathLike[str]) -> Path:
    """Writes `model` as a ViTForImageClassification folder (config, weights, image processor)."""
    cfg = model.config
    # transformers' ViT classifies the class token's final state (after the last norm): each
    # condition below names the one thing of ours that it has no setting for.
    unsupported = [why for bad, why in (
        (not cfg.class_token, "a model without a class token"),
        (cfg.class_token and cfg.global_pool == "avg",
         "average pooling of the patch tokens (global_pool 'avg', then fc_norm): it classifies the class token"),
        (cfg.init_values is not None, f"layer scale (init_values {cfg.init_values})"),
        (cfg.num_classes == 0, "a headless model (num_classes 0)"),
    ) if bad]
    if unsupported:
        raise TransformersFormatError(f"transformers' ViTForImageClassification cannot express "
                                      f"{'; '.join(unsupported)}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    id2label = {str(i): name for i, name in enumerate(artifact.class_names)}
    hf_config = {
        "architectures": ["ViTForImageClassification"], "model_type": "vit",
        "hidden_size": cfg.embed_dim, "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "intermediate_size": int(cfg.embed_dim * cfg.mlp_ratio), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans, "qkv_bias": cfg.qkv_bias, "encoder_stride": cfg.patch_size,
        "id2label": id2label, "label2id": {name: int(i) for i, name in id2label.items()},
        "torch_dtype": "float32",
    }
    p = artifact.preprocessing
    # ViTImageProcessor resizes straight to `size` (no crop); a centre crop needs one that crops.
    processor: dict[str, Any] = {
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(p.mean), "image_std": list(p.std),
        "resample": {v: k for k, v in _PIL_RESAMPLE.items()}[p.interpolation],
        "size": {"height": p.image_size, "width": p.image_size},
    }
    if p.crop_mode == "center" and p.crop_pct < 1.0 and p.image_size < 384:
        # ConvNextImageProcessor: shorter side to size / crop_pct, centre crop (below 384 px).
        processor.update(image_processor_type="ConvNextImageProcessor",
                         size={"shortest_edge": p.image_size}, crop_pct=p.crop_pct)
    state = state_dict_to_transformers(model.state_dict(), cfg.depth)
    save_safetensors(state, d / WEIGHTS_FILE)
    (d / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
    (d / PROCESSOR_FILE).write_text(json.dumps(processor, indent=2))
    return d


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TransformersFormatError(f"{path}: no such file") from None
    except (json.JSONDecodeError, OSError) as e:
        raise TransformersFormatError(f"{path}: not readable JSON ({e})") from None


__all__ = ["TransformersFormatError", "is_transformers_dir", "load_transformers", "save_transformers_folder",
           "config_from_transformers", "state_dict_from_transformers", "state_dict_to_transformers",
           "preprocessing_from_transformers"]
