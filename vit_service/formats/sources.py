"""Any model source -> (VisionTransformer, ModelArtifact), without Lightning: the one loader behind
`vit-explain --model`, `vit-export --ckpt/--run/--from` and the pointing game.

    exported model folder   model.safetensors + vit_artifact.json
    vit-train run folder    version_N/ holding checkpoints/: its best checkpoint by the monitored metric
    vit-train checkpoint    .ckpt: carries the resolved ViTConfig ("model_config"), classes, preprocessing
    transformers folder     config.json + model.safetensors (+ preprocessor_config.json)
    timm hub name           vit_small_patch16_224.augreg_in21k_ft_in1k (from the Hugging Face cache)
    weight file + arch      a timm / DeiT / torchvision state dict; `arch` names its timm architecture
    BentoML tag             name or name:version in the BentoML model store

Local paths win over names. Every failure is a ModelSourceError whose message names the source.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vit_service.artifact import ArtifactError, ModelArtifact, is_artifact_dir, load_model
from vit_service.formats.checkpoints import CheckpointError, _torch_load, load_weights
from vit_service.formats.pretrained import build_model_config, is_hub_name, load_pretrained
from vit_service.formats.transformers_vit import is_transformers_dir
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import Preprocessing

CHECKPOINT_CONFIG_KEY = "model_config"  # the resolved ViTConfig.to_dict() in every vit-train checkpoint
_TRAINING_KEYS = ("preset", "num_classes", "class_names", "preprocessing")


class ModelSourceError(ValueError):
    """The named model cannot be found or read; the message names it and says why."""


def load_model_source(source: str | os.PathLike[str], device: str | torch.device = "cpu", *, ema: bool = False,
                      arch: str | None = None) -> tuple[VisionTransformer, ModelArtifact]:
    """Our model (eval mode, on `device`) and its artifact from any source in the module docstring.

    `ema` takes a checkpoint's EMA weights (an error when it has none); `arch` is the timm
    architecture of a bare weight file.
    """
    path = Path(source)
    try:
        if path.is_dir():
            if (path / "checkpoints").is_dir() and not is_artifact_dir(path):
                best = best_checkpoint(path)
                model, artifact = load_checkpoint(best.path, ema=ema)
                artifact.metadata["selected_by"] = {"monitor": best.monitor, "mode": best.mode, "score": best.score}
            elif is_artifact_dir(path) or is_transformers_dir(path):
                model, artifact = load_pretrained(path)
            else:
                raise ModelSourceError(f"{source}: a folder with no model in it: no checkpoints (a vit-train "
                                       "run holds checkpoints/*.ckpt), no exported model (model.safetensors + "
                                       "vit_artifact.json), no transformers model (config.json + model.safetensors)")
        elif path.is_file():
            if arch or path.suffix == ".safetensors":  # a bare weight file: its architecture is `arch`
                model, artifact = load_pretrained(path, arch=arch)
            else:
                model, artifact = load_checkpoint(path, ema=ema)
        elif is_hub_name(str(source)):  # before the path test: timm/NAME and hf-hub:OWNER/REPO hold a "/"
            model, artifact = load_pretrained(str(source))
        elif path.suffix in (".ckpt", ".pt", ".pth", ".safetensors") or os.sep in str(source) or "/" in str(source):
            raise ModelSourceError(f"{source}: no such checkpoint file or model folder")
        else:
            model, artifact = _from_bentoml_store(str(source))
    except (ArtifactError, CheckpointError) as e:  # HubError is a CheckpointError
        raise ModelSourceError(str(e)) from None
    return model.to(device).eval(), artifact


def load_checkpoint(path: str | os.PathLike[str], ema: bool = False) -> tuple[VisionTransformer, ModelArtifact]:
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
        "epoch": info.get("epoch", ckpt.get("epoch")),
        "global_step": info.get("global_step", ckpt.get("global_step")),
        "train_time_s": info.get("train_time_s"),
        "dataset": {"train_dir": dm_hp.get("train_dir"), "val_dir": dm_hp.get("val_dir")},
        "training_config": {k: v for k, v in hp.items() if k != "class_names"},
    }
    artifact = ModelArtifact(config, list(hp["class_names"]), Preprocessing.from_dict(hp["preprocessing"]), metadata)
    return model.eval(), artifact


@dataclass(frozen=True)
class BestCheckpoint:
    path: Path
    monitor: str
    mode: str
    score: float


def best_checkpoint(run_dir: str | os.PathLike[str]) -> BestCheckpoint:
    """The run's best checkpoint by the metric its ModelCheckpoint monitored.

    Lightning's ModelCheckpoint state (saved in every checkpoint) records each kept checkpoint's
    score (`best_k_models`); the newest checkpoint's record is read, so a run folder that was
    moved or copied still works (files are matched by name inside run_dir/checkpoints).
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    files = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if not files:
        raise ModelSourceError(f"{run_dir}: no checkpoints (expected {ckpt_dir}/*.ckpt from vit-train fit)")
    states = [_checkpoint_state(f) for f in files]
    newest = max(states, key=lambda s: s[0])
    candidates: list[BestCheckpoint] = []
    for key, state in newest[1].items():
        monitor, mode = _monitor_and_mode(key, state)
        if not monitor:
            continue
        for file, score in (state.get("best_k_models") or {}).items():
            local = ckpt_dir / Path(file).name
            if local.is_file():
                candidates.append(BestCheckpoint(local, monitor, mode, float(score)))
    if not candidates:
        raise ModelSourceError(f"{run_dir}: its checkpoints record no monitored metric; pick one with --ckpt")
    sign = 1.0 if candidates[0].mode == "max" else -1.0
    return max(candidates, key=lambda c: sign * c.score)


def _checkpoint_state(path: Path) -> tuple[tuple[int, int, float], dict[str, dict]]:
    try:  # mmap: only the metadata is read, not every tensor
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # any unpickling failure means "not a checkpoint"
        raise ModelSourceError(f"{path}: not a readable checkpoint ({e})") from None
    callbacks = {k: v for k, v in (ckpt.get("callbacks") or {}).items() if k.startswith("ModelCheckpoint")}
    return (int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0)), path.stat().st_mtime), callbacks


def _monitor_and_mode(key: str, state: dict) -> tuple[str | None, str]:
    # Lightning keys the callback's state by its settings: "ModelCheckpoint{'monitor': ..., 'mode': ...}".
    try:
        settings = ast.literal_eval(key[len("ModelCheckpoint"):])
    except (ValueError, SyntaxError):
        settings = {}
    return settings.get("monitor") or state.get("monitor"), settings.get("mode", "min")


def _from_bentoml_store(tag: str) -> tuple[VisionTransformer, ModelArtifact]:
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


__all__ = ["load_model_source", "load_checkpoint", "best_checkpoint", "BestCheckpoint", "ModelSourceError",
           "CHECKPOINT_CONFIG_KEY"]
