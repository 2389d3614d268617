"""Where a model comes from: one ordered list of formats, and the two walks over it.

    exported model folder   model.safetensors + vit_artifact.json
    transformers folder     config.json + model.safetensors (+ preprocessor_config.json)
    weight file + arch      a timm / DeiT / torchvision state dict; `arch` names its timm architecture
    vit-train checkpoint    .ckpt: carries the resolved ViTConfig ("model_config"), classes, preprocessing
    timm hub name           vit_small_patch16_224.augreg_in21k_ft_in1k (from the Hugging Face cache)
    BentoML tag             name or name:version in the BentoML model store

Like timm's `create_model` + `pretrained_cfg`: each `ModelFormat` says whether it matches a source,
how to load it (model + artifact), and, for fine-tuning, the architecture it fixes and the weights
`load_weights` reads. `load_model_source` (vit-explain, vit-export) and `init_from_source`
(`--model.init_from`) take the first format that matches. The training side puts vit-train run
folders in front of this list (training/run_checkpoints.py): run folders are Lightning's layout,
which this package never reads. Local paths win over names. Every failure is a ModelSourceError
whose message names the source.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vit_service.artifact import ArtifactError, ModelArtifact, is_artifact_dir, load_model
from vit_service.formats.checkpoints import CheckpointError, Source, _torch_load, load_weights
from vit_service.formats.pretrained import is_hub_name, load_weight_file
from vit_service.formats.timm_hub import load_timm, timm_config, timm_weights_path
from vit_service.formats.transformers_vit import (
    config_from_transformers, is_transformers_dir, load_transformers, read_json,
)
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import Preprocessing

CHECKPOINT_CONFIG_KEY = "model_config"  # the resolved ViTConfig.to_dict() in every vit-train checkpoint
_TRAINING_KEYS = ("preset", "num_classes", "class_names", "preprocessing")
Loaded = tuple[VisionTransformer, ModelArtifact]


class ModelSourceError(ValueError):
    """The named model cannot be found or read; the message names it and says why."""


@dataclass(frozen=True)
class ModelFormat:
    name: str
    matches: Callable[[str, str | None], bool]  # (source, arch) -> is it this format
    load: Callable[[str, bool, str | None], Loaded]  # (source, ema, arch) -> model (eval mode) + artifact
    config: Callable[[str], ViTConfig] | None = None  # the architecture it fixes for fine-tuning; None: the preset's
    weights: Callable[[str], Source] | None = None  # what load_weights reads for fine-tuning; None: not a start


def _is_weight_file(source: str, arch: str | None) -> bool:
    return Path(source).is_file() and bool(arch or source.endswith(".safetensors"))


def _is_checkpoint(source: str, arch: str | None) -> bool:
    return Path(source).is_file() and not _is_weight_file(source, arch)


def _transformers_state(source: str) -> Source:
    return load_transformers(source)[0].state_dict()  # its tensors under timm's names


def _is_store_tag(source: str, arch: str | None) -> bool:
    looks_like_path = Path(source).suffix in (".ckpt", ".pt", ".pth", ".safetensors") or os.sep in source or "/" in source
    return not Path(source).exists() and not looks_like_path


FORMATS: tuple[ModelFormat, ...] = (
    ModelFormat("exported model folder", lambda s, a: is_artifact_dir(s), lambda s, e, a: load_model(s),
                weights=str),
    ModelFormat("transformers folder", lambda s, a: is_transformers_dir(s), lambda s, e, a: load_transformers(s),
                config=lambda s: config_from_transformers(read_json(Path(s) / "config.json")),
                weights=_transformers_state),
    ModelFormat("weight file", _is_weight_file, lambda s, e, a: load_weight_file(Path(s), a), weights=str),
    ModelFormat("vit-train checkpoint", _is_checkpoint, lambda s, e, a: load_checkpoint(s, ema=e), weights=str),
    ModelFormat("timm hub name", lambda s, a: is_hub_name(s), lambda s, e, a: load_timm(s),
                config=timm_config, weights=timm_weights_path),
    ModelFormat("BentoML tag", _is_store_tag, lambda s, e, a: _from_bentoml_store(s)),
)


def load_model_source(source: str | os.PathLike[str], device: str | torch.device = "cpu", *, ema: bool = False,
                      arch: str | None = None, formats: Sequence[ModelFormat] = FORMATS) -> Loaded:
    """Our model (eval mode, on `device`) and its artifact from the first of `formats` that matches.

    `ema` takes a checkpoint's EMA weights (an error when it has none); `arch` is the timm
    architecture of a bare weight file.
    """
    name = str(source)
    fmt = next((f for f in formats if f.matches(name, arch)), None)
    if fmt is None and Path(name).is_dir():
        raise ModelSourceError(f"{source}: a folder with no model in it: no checkpoints (a vit-train "
                               "run holds checkpoints/*.ckpt), no exported model (model.safetensors + "
                               "vit_artifact.json), no transformers model (config.json + model.safetensors)")
    if fmt is None:
        raise ModelSourceError(f"{source}: no such checkpoint file or model folder")
    try:
        model, artifact = fmt.load(name, ema, arch)
    except (ArtifactError, CheckpointError) as e:  # HubError is a CheckpointError
        raise ModelSourceError(str(e)) from None
    return model.to(device).eval(), artifact


@dataclass(frozen=True)
class InitSource:
    config: ViTConfig | None  # the architecture the source fixes, or None (the run's preset decides)
    weights: Source  # what load_weights reads


def init_from_source(source: str, formats: Sequence[ModelFormat] = FORMATS) -> InitSource:
    """What `--model.init_from` starts from: the first of `formats` that matches and can be a
    start; anything else goes to `load_weights` as given (which names what is wrong with it)."""
    fmt = next((f for f in formats if f.weights is not None and f.matches(source, None)), None)
    if fmt is None or fmt.weights is None:
        return InitSource(None, source)
    return InitSource(fmt.config(source) if fmt.config else None, fmt.weights(source))


def build_model_config(preset: str, num_classes: int, image_size: int | None,
                       overrides: dict[str, Any] | None, init_from: str | None = None) -> ViTConfig:
    """The one place a training run's ViTConfig is derived from its hyper-parameters.

    A timm hub name or transformers folder in `init_from` fixes the architecture (so it is not
    typed twice); `preset` then goes unused. Training saves the result in every checkpoint, so
    readers only come here for checkpoints written before it did.
    """
    extra: dict[str, Any] = dict(overrides or {})
    if image_size is not None:
        extra["image_size"] = image_size
    base = init_from_source(init_from).config if init_from else None
    if base is not None:
        return replace(base, num_classes=num_classes, **extra)
    return ViTConfig.from_preset(preset, num_classes=num_classes, **extra)


def load_checkpoint(path: str | os.PathLike[str], ema: bool = False) -> Loaded:
    """A vit-train Lightning checkpoint -> the trained model and an artifact with its training record.

    The architecture is the ViTConfig the checkpoint carries; checkpoints written before it did
    are rebuilt from their hyper-parameters as training derived it (preset, overrides, init_from).
    """
    path = Path(path)
    ckpt = _torch_load(path)
    hp: dict[str, Any] = dict(ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    missing = [k for k in _TRAINING_KEYS if not hp.get(k)]
    if missing:
        raise ModelSourceError(f"{path}: not a vit-train checkpoint (its hyper-parameters lack {missing}); "
                               "for a bare weight file give its architecture (--arch, a timm name)")
    if ema and "current_model_state" not in ckpt:
        raise ModelSourceError(f"{path}: has no EMA weights (train with the EMAWeightAveraging callback)")
    if ckpt.get(CHECKPOINT_CONFIG_KEY):
        config, built = ViTConfig.from_dict(ckpt[CHECKPOINT_CONFIG_KEY]), ""
    else:
        config = build_model_config(hp["preset"], hp["num_classes"], hp.get("image_size"),
                                    hp.get("model_overrides"), hp.get("init_from"))
        built = (f" (an older checkpoint without its {CHECKPOINT_CONFIG_KEY}: the model was rebuilt from "
                 f"preset {hp['preset']!r}, overrides {hp.get('model_overrides')} and init_from {hp.get('init_from')!r})")
    model = VisionTransformer(config)
    try:
        load_weights(model, ckpt, prefer_ema=ema)
    except CheckpointError as e:
        raise ModelSourceError(f"{path}: {e}{built}") from None
    info = ckpt.get("vit_service") or {}
    dm_hp = ckpt.get("datamodule_hyper_parameters") or {}
    metadata = {
        "source_checkpoint": str(path.resolve()),
        "source_checkpoint_mtime": path.stat().st_mtime,  # with the path: "the same file" for re-exports
        "weights": "ema" if ema else "raw",
        "val_acc1": info.get("val_acc1"),
        "val_acc5": info.get("val_acc5"),
        "val_images": info.get("val_images"),  # what the figures are over: fewer than the total when
        "val_images_total": info.get("val_images_total"),  # validation was limited (limit_val_batches)
        "epoch": info.get("epoch", ckpt.get("epoch")),
        "global_step": info.get("global_step", ckpt.get("global_step")),
        "train_time_s": info.get("train_time_s"),
        "dataset": {"train_dir": dm_hp.get("train_dir"), "val_dir": dm_hp.get("val_dir")},
        "training_config": {k: v for k, v in hp.items() if k != "class_names"},
    }
    artifact = ModelArtifact(config, list(hp["class_names"]), Preprocessing.from_dict(hp["preprocessing"]), metadata)
    return model.eval(), artifact


def _from_bentoml_store(tag: str) -> Loaded:
    import bentoml  # only for tags: folders and checkpoints load without it

    try:
        bento_model = bentoml.models.get(tag)
    except Exception as e:  # NotFound, bad tag syntax, ...
        raise ModelSourceError(f"{tag}: not a file, a folder, a timm model name or a model in the BentoML "
                               f"store ({type(e).__name__}: {e})") from None
    try:
        return load_model(bento_model.path)
    except ArtifactError as e:
        raise ModelSourceError(f"{tag}: {e}") from None


__all__ = ["FORMATS", "Loaded", "ModelFormat", "InitSource", "load_model_source", "init_from_source", "load_checkpoint",
           "build_model_config", "ModelSourceError", "CHECKPOINT_CONFIG_KEY"]
