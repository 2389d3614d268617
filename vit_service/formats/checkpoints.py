"""Loads ViT weights from the checkpoint formats people actually have, into our VisionTransformer.

Recognised: timm/DeiT state dicts (plain, or wrapped in `model` / `state_dict` / `model_ema` /
`state_dict_ema`, with DDP `module.` or torch.compile `_orig_mod.` prefixes), torchvision's
`VisionTransformer`, Lightning checkpoints of our training module (`model.*`; EMA weights as
`ema.module.*` or as saved by Lightning's WeightAveraging callback) and our exported artifact
directory. Plain PyTorch + safetensors: serving ships neither Lightning nor timm.

Nothing loads partially by accident: unmatched keys are a `CheckpointError` unless strict=False,
and then the report lists them. Two differences are adapted and reported: another position
grid (pos_embed is resampled) and another number of classes (the head is left freshly initialised).
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vit_service.artifact import WEIGHTS_FILE, is_artifact_dir
from vit_service.model import VisionTransformer, resample_pos_embed

StateDict = dict[str, torch.Tensor]
Source = str | os.PathLike[str] | Mapping[str, Any]

_PLAIN_KEYS = ("model", "state_dict")
_EMA_KEYS = ("model_ema", "state_dict_ema")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
_MAX_LISTED = 20

# torchvision VisionTransformer name -> timm name; applied in order, first match wins.
_TORCHVISION_RULES = [
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^class_token$", "cls_token"),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(3|linear_2)\.", r"blocks.\1.mlp.fc2."),
]


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model; the message says which and why."""


@dataclass
class LoadReport:
    source: str
    format: str  # "timm", "torchvision", "lightning", "artifact" or "state_dict" (in-memory timm names)
    loaded: int  # tensors copied into the model
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint lacks (strict=False)
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model lacks (strict=False)
    pos_embed_resampled: tuple[tuple[int, int], tuple[int, int]] | None = None  # (old grid, new grid)
    head_reinitialized: bool = False

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source} ({self.format})"]
        if self.pos_embed_resampled:
            (a, b), (c, d) = self.pos_embed_resampled
            parts.append(f"pos_embed resampled {a}x{b} -> {c}x{d}")
        if self.head_reinitialized:
            parts.append("head not loaded (class count differs), left freshly initialised")
        line = "; ".join(parts)
        if self.missing or self.unexpected:
            line += f"\n  missing {_listing(self.missing)}; unexpected {_listing(self.unexpected)}"
        return line


def load_weights(
    model: VisionTransformer, source: Source, *, strict: bool = True, prefer_ema: bool = False
) -> LoadReport:
    """Loads `source` (a checkpoint path, artifact directory or state dict) into `model` in place."""
    raw, desc, fmt = _read(source)
    state, desc, fmt = _unwrap(raw, desc, fmt, prefer_ema)
    target = model.state_dict()
    _check_patch_embed(state, target)
    head_reinit = _drop_mismatched_head(state, target)
    keep_head = ("head.weight", "head.bias") if head_reinit else ()  # the model's own, on purpose
    missing = [k for k in target if k not in state and k not in keep_head]
    unexpected = [k for k in state if k not in target]
    if strict and (missing or unexpected):
        raise CheckpointError(_unmatched_message(desc, missing, unexpected))
    resampled = _fit_pos_embed(state, target, model.num_prefix_tokens)
    _check_shapes(state, target, desc)
    state = {k: v for k, v in state.items() if k in target}
    model.load_state_dict(state, strict=False)
    return LoadReport(desc, fmt, len(state), missing, unexpected, resampled, head_reinit)


def _read(source: Source) -> tuple[Any, str, str]:
    """Returns (loaded object, description, format guess) for a path or an in-memory dict."""
    if isinstance(source, Mapping):
        return source, "in-memory state dict", "state_dict"
    path = Path(source)
    if path.is_dir():
        if not is_artifact_dir(path):
            raise CheckpointError(f"{path} is a directory but not an exported model (no {WEIGHTS_FILE} + manifest)")
        return _load_safetensors(path / WEIGHTS_FILE), str(path), "artifact"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path), str(path), "timm"
    return _torch_load(path), str(path), "timm"


def _load_safetensors(path: Path) -> StateDict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses arbitrary pickled objects, and a user's own Lightning checkpoint
        # holds some (hyper-parameters, argparse Namespaces). The user named this file, so it
        # is trusted as much as any code they run; retry with the full unpickler.
        pass
    except Exception as e:  # garbage bytes fail in many ways inside the unpickler
        raise _unreadable(path, e) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable checkpoint (PyTorch: {type(e).__name__}: {e})")


def _unwrap(raw: Any, desc: str, fmt: str, prefer_ema: bool) -> tuple[StateDict, str, str]:
    """Finds the model's tensors inside a training checkpoint and strips wrapper prefixes."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{desc}: expected a dict of tensors, got {type(raw).__name__}")
    key = _wrapper_key(raw, prefer_ema)
    if key is not None:
        raw, desc = raw[key], f"{desc}['{key}']"
    state = {_strip_wrappers(k): v for k, v in raw.items()}
    for layout in KEY_LAYOUTS:
        if layout.matches(state):
            state, taken = layout.to_timm(state, prefer_ema)
            desc, fmt = desc + taken, layout.name
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{desc}: no state dict found (keys: {_listing(list(raw))})")
    return state, desc, fmt


def _wrapper_key(raw: Mapping[str, Any], prefer_ema: bool) -> str | None:
    """The key holding the weights in a training checkpoint; None for a plain state dict."""
    if isinstance(raw.get("current_model_state"), Mapping):
        # Lightning's WeightAveraging (EMA) callback saves the average as `state_dict` and moves
        # the raw weights to `current_model_state`.
        return "state_dict" if prefer_ema else "current_model_state"
    order = _EMA_KEYS + _PLAIN_KEYS if prefer_ema else _PLAIN_KEYS + _EMA_KEYS
    return next((k for k in order if isinstance(raw.get(k), Mapping)), None)


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _from_lightning(state: StateDict, prefer_ema: bool) -> tuple[StateDict, str]:
    """Our LightningModule's tensors: `model.*`, EMA copy `ema.module.*`; the rest is training state."""
    has_ema = any(k.startswith("ema.module.") for k in state)
    has_model = any(k.startswith("model.") for k in state)
    prefix = "ema.module." if has_ema and (prefer_ema or not has_model) else "model."
    picked = {_strip_wrappers(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}
    return picked, f" [{prefix}*]"


def rename_key(key: str, rules: list[tuple[str, str]]) -> str:
    """`key` renamed by the first (regex, replacement) rule that matches it; unchanged if none does."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _from_torchvision(state: StateDict, prefer_ema: bool) -> tuple[StateDict, str]:
    """Renames torchvision keys to timm's; unknown keys (e.g. heads.pre_logits) keep their names."""
    return {rename_key(k, _TORCHVISION_RULES): v for k, v in state.items()}, ""


@dataclass(frozen=True)
class KeyLayout:
    """How a state dict names the model's tensors, when not timm's way: the format `load_weights`
    reports, whether a state dict uses it, and its tensors under timm's names (+ what was taken)."""
    name: str
    matches: Callable[[StateDict], bool]
    to_timm: Callable[[StateDict, bool], tuple[StateDict, str]]  # (state, prefer_ema) -> (state, description)


# Undone in this order, each one that matches: a Lightning checkpoint of a torchvision model is both.
KEY_LAYOUTS: tuple[KeyLayout, ...] = (
    KeyLayout("lightning", lambda s: any(k.startswith(("model.", "ema.module.")) for k in s), _from_lightning),
    KeyLayout("torchvision", lambda s: any(k.startswith(("conv_proj.", "encoder.layers.")) or k == "class_token"
                                           for k in s), _from_torchvision),
)


def _check_patch_embed(state: StateDict, target: StateDict) -> None:
    w = state.get("patch_embed.proj.weight")
    if w is None:
        return  # reported as a missing key
    want = target["patch_embed.proj.weight"]  # (D, C, P, P)
    if w.shape[-2:] != want.shape[-2:]:
        raise CheckpointError(
            f"checkpoint patch size {tuple(w.shape[-2:])} differs from the model's {tuple(want.shape[-2:])}"
        )
    if w.shape[1] != want.shape[1]:
        raise CheckpointError(f"checkpoint has {w.shape[1]} input channels, the model {want.shape[1]}")


def _drop_mismatched_head(state: StateDict, target: StateDict) -> bool:
    """A checkpoint for another class count (or a headless one) leaves the model's new head."""
    ckpt_w, model_w = state.get("head.weight"), target.get("head.weight")  # (classes, D)
    if ckpt_w is None and model_w is None:
        return False
    if ckpt_w is not None and model_w is not None and ckpt_w.shape[0] == model_w.shape[0]:
        return False  # same class count; another width is named by _check_shapes
    state.pop("head.weight", None)
    state.pop("head.bias", None)
    return True


def _fit_pos_embed(
    state: StateDict, target: StateDict, num_prefix_tokens: int
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    pos, want = state.get("pos_embed"), target["pos_embed"]
    if pos is None or pos.shape == want.shape or pos.shape[-1] != want.shape[-1]:
        return None  # missing, equal, or another width (named by _check_shapes)
    old = math.isqrt(pos.shape[1] - num_prefix_tokens)
    new = math.isqrt(want.shape[1] - num_prefix_tokens)
    try:
        state["pos_embed"] = resample_pos_embed(pos, (new, new), num_prefix_tokens)
    except ValueError as e:
        raise CheckpointError(f"cannot resample pos_embed {tuple(pos.shape)} to {tuple(want.shape)}: {e}") from None
    return (old, old), (new, new)


def _check_shapes(state: StateDict, target: StateDict, desc: str) -> None:
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
           for k, v in state.items() if k in target and v.shape != target[k].shape]
    if bad:
        raise CheckpointError(f"{desc}: {len(bad)} tensors have the wrong shape (another config?): "
                              + "; ".join(bad[:_MAX_LISTED]))


def _unmatched_message(desc: str, missing: list[str], unexpected: list[str]) -> str:
    msg = f"{desc} does not match the model: missing {_listing(missing)}; unexpected {_listing(unexpected)}"
    if any(k.startswith("heads.pre_logits") for k in unexpected):
        msg += " (torchvision's heads.pre_logits layer, representation_size, is not supported)"
    return msg + "; pass strict=False to load the rest"


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return f"{len(keys)} [{shown}{more}]"


__all__ = ["CheckpointError", "LoadReport", "load_weights"]
