"""timm model names -> our VisionTransformer, with weights from the Hugging Face cache.

Accepts what a timm user types: `vit_small_patch16_224.augreg_in21k_ft_in1k`,
`timm/vit_small_patch16_224.augreg_in21k_ft_in1k` or `hf-hub:timm/...` (any `hf-hub:owner/repo`
holding a timm ViT works too). Nothing is typed twice: the architecture (depth, width, heads,
patch, image size, classes) comes from timm's own model definition (`pretrained=False`, no
download), the preprocessing from its `pretrained_cfg`, the weights from `huggingface_hub`, which
honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE. Variants our model cannot express (registers,
distillation token, qk-norm, pre-norm, attention pooling...) are refused with the reason, and
every conversion is checked by running both models on the same input, so a model that loads is
the model timm would build.

timm is imported here only: serving never reads this module.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vit_service.artifact import ModelArtifact
from vit_service.formats.checkpoints import CheckpointError, load_weights
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import Preprocessing

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold, in timm's order
_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)?$")
_REPO = re.compile(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")
HUB_PROBE_TIMEOUT_S = 2.0  # one TCP connect to the hub (or the proxy) before huggingface_hub's own retries


class HubError(CheckpointError):
    """A hub name that cannot be resolved or loaded; the message names the repo and the fix."""


@dataclass(frozen=True)
class TimmSource:
    model_name: str  # what timm.create_model takes
    repo_id: str  # the Hugging Face repo holding the weights
    weight_files: tuple[str, ...] = _WEIGHT_FILES


def parse_timm_name(name: str) -> TimmSource | None:
    """The timm model and hub repo a user's spelling names, or None if it names none.

    `vit_x.tag`, `timm/vit_x.tag` and `hf-hub:timm/vit_x.tag` are the same model; another owner's
    `hf-hub:owner/repo` is read through timm's hub support (its config.json from the cache).
    """
    from timm.models import get_pretrained_cfg, is_model, split_model_name_tag

    text = str(name).strip()
    hub = text.startswith("hf-hub:")
    text = text.removeprefix("hf-hub:")
    if text.startswith("timm/"):
        text = text.removeprefix("timm/")
    elif hub:
        return TimmSource(f"hf-hub:{text}", text) if _REPO.match(text) else None
    if not _NAME.match(text):
        return None
    arch, tag = split_model_name_tag(text)
    if not is_model(arch):
        return None
    try:
        cfg = get_pretrained_cfg(text, allow_unregistered=False) if tag else get_pretrained_cfg(arch)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        raise HubError(f"timm has no pretrained tag {tag!r} for {arch}; list them with "
                       f"python -c \"import timm; print(timm.list_pretrained('{arch}*'))\"")
    if not cfg.hf_hub_id:
        raise HubError(f"timm's {text} has no Hugging Face hub weights (hf_hub_id is empty)")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _WEIGHT_FILES
    return TimmSource(f"{arch}.{cfg.tag}" if cfg.tag else arch, cfg.hf_hub_id, files)


def is_timm_name(name: str) -> bool:
    try:
        return parse_timm_name(name) is not None
    except HubError:
        return True  # a timm name with a problem: loading it will say which


def cached_file(repo_id: str, filenames: tuple[str, ...], library: str = "timm") -> str:
    """The local path of the first of `filenames` in `repo_id`, via huggingface_hub (cache first).

    Offline and not cached: a HubError naming the repo and the command that fetches it.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    unreachable = go_offline_if_hub_unreachable()
    problem: Exception | None = None
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, library_name=library)
        except EntryNotFoundError:
            continue  # the repo exists and lacks this file: try the next name
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
            problem = problem or e
    if unreachable:
        raise HubError(f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is "
                       f"unreachable ({unreachable}); fetch it once where there is network with: hf download "
                       f"{repo_id} (into this cache: same HF_HOME / HF_HUB_CACHE), then work offline with HF_HUB_OFFLINE=1")
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                       f"HF_HUB_OFFLINE is set; fetch it once with: hf download {repo_id}")
    reason = f"{type(problem).__name__}: {str(problem).splitlines()[0]}" if problem else "no weight file"
    raise HubError(f"cannot get {repo_id} ({', '.join(filenames)}) from the Hugging Face hub or its cache "
                   f"({constants.HF_HUB_CACHE}): {reason}; fetch it with: hf download {repo_id}")


def go_offline_if_hub_unreachable() -> str | None:
    """Without HF_HUB_OFFLINE, one short connect to the hub first: when it fails, huggingface_hub
    is switched to offline mode for this process (the cache still answers, at once) and the reason
    is returned; otherwise every file costs a minute of huggingface_hub's retries before failing.
    None when the hub answers or HF_HUB_OFFLINE is already set."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    reason = _hub_unreachable(constants.ENDPOINT)
    if reason:
        constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub (is_offline_mode)
    return reason


@functools.cache
def _hub_unreachable(endpoint: str) -> str | None:
    """Why `endpoint` (or the HTTPS proxy in use) takes no TCP connection within
    HUB_PROBE_TIMEOUT_S, or None. Name resolution is inside the bound too (a thread)."""
    url = urllib.parse.urlsplit(endpoint)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") if url.scheme == "https" else None
    target = urllib.parse.urlsplit(proxy) if proxy else url
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    outcome: dict[str, str] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome["ok"] = ""
        except OSError as e:
            outcome["error"] = f"{type(e).__name__}: {e}"

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_PROBE_TIMEOUT_S)
    if "ok" in outcome:
        return None
    return (f"{'proxy ' if proxy else ''}{host}:{port}: "
            + outcome.get("error", f"no connection within {HUB_PROBE_TIMEOUT_S:g} s"))


def create_timm_model(source: TimmSource, device: str = "cpu") -> nn.Module:
    """timm's model for `source`, randomly initialised (the definition only, no weights).

    On the "meta" device it costs nothing and still tells the architecture."""
    import timm

    if source.model_name.startswith("hf-hub:"):  # timm reads config.json through huggingface_hub
        go_offline_if_hub_unreachable()

    try:
        return timm.create_model(source.model_name, pretrained=False, device=device)
    except Exception as e:  # hf-hub names read config.json through the cache, which can fail
        if source.model_name.startswith("hf-hub:"):
            cached_file(source.repo_id, ("config.json",))  # raises the one-line cache message
        raise HubError(f"timm cannot build {source.model_name}: {type(e).__name__}: {e}") from None


def config_from_timm(tm: nn.Module, name: str) -> ViTConfig:
    """Our ViTConfig for a timm VisionTransformer, or a HubError naming what we do not support."""
    from timm.layers import LayerScale
    from timm.models.vision_transformer import Block, VisionTransformer as TimmViT

    def refuse(what: str) -> HubError:
        return HubError(f"{name}: {what} is not supported by this project's ViT (see the table of timm "
                        "ViTs in docs/pretrained.md); pick a plain ViT, e.g. vit_small_patch16_224.augreg_in21k_ft_in1k")

    if type(tm) is not TimmViT:
        hint = " (distilled DeiT: a distillation token and second head)" if "Distilled" in type(tm).__name__ else ""
        raise refuse(f"timm class {type(tm).__name__}{hint}")
    if getattr(tm, "num_reg_tokens", 0):
        raise refuse(f"register tokens ({tm.num_reg_tokens})")
    if getattr(tm, "no_embed_class", False):
        raise refuse("position embeddings without a class-token slot (no_embed_class)")
    if tm.global_pool not in ("token", "avg") or getattr(tm, "attn_pool", None) is not None:
        raise refuse(f"global pooling {tm.global_pool!r}")
    if not isinstance(tm.norm_pre, nn.Identity):
        raise refuse("a pre-norm before the blocks (CLIP-style norm_pre)")
    if not isinstance(tm.patch_embed.norm, nn.Identity):
        raise refuse("a norm in the patch embedding")
    block = tm.blocks[0]
    if type(block) is not Block:
        raise refuse(f"block type {type(block).__name__}")
    if not isinstance(getattr(block.attn, "q_norm", nn.Identity()), nn.Identity):
        raise refuse("qk-norm")
    avg = tm.global_pool == "avg"
    if isinstance(tm.norm, nn.Identity) != avg or isinstance(tm.fc_norm, nn.Identity) == avg:
        raise refuse("average pooling after the final norm (fc_norm=False)" if avg else "an extra fc_norm")
    (ph, pw), (ih, iw) = tm.patch_embed.patch_size, tm.patch_embed.img_size
    if ph != pw or ih != iw:
        raise refuse(f"a non-square patch {ph}x{pw} or image {ih}x{iw}")
    # The LayerScale init value only matters for a fresh init (weights are loaded over it), and a
    # model on the meta device has no values: timm's usual 1e-5 stands in there.
    gamma = block.ls1.gamma if isinstance(block.ls1, LayerScale) else None
    init_values = None if gamma is None else (1e-5 if gamma.is_meta else gamma.flatten()[0].item())
    return ViTConfig(
        image_size=ih, patch_size=ph, in_chans=tm.patch_embed.proj.in_channels,
        num_classes=tm.num_classes, embed_dim=tm.embed_dim, depth=len(tm.blocks),
        num_heads=block.attn.num_heads, mlp_ratio=block.mlp.fc1.out_features / tm.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None, global_pool=tm.global_pool,
        class_token=tm.has_class_token, init_values=init_values, norm_eps=block.norm1.eps,
    )


@torch.no_grad()
def check_same_function(tm: nn.Module, ours: VisionTransformer, name: str) -> None:
    """Copies timm's (random) weights into ours and compares outputs: the guard against any
    architectural difference the checks above do not name (activation, norm eps, biases...)."""
    try:
        load_weights(ours, tm.state_dict())
    except CheckpointError as e:
        raise HubError(f"{name}: timm's parameters do not map onto this project's ViT ({e})") from None
    S = ours.config.image_size
    x = torch.randn(2, ours.config.in_chans, S, S, generator=torch.Generator().manual_seed(0))
    a, b = tm.eval()(x), ours.eval()(x)
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-3):
        raise HubError(f"{name}: this project's ViT computes something else than timm's "
                       f"(max abs difference {(a - b).abs().max().item():.2e}); variant not supported")


def preprocessing_from_timm(tm: nn.Module) -> Preprocessing:
    """The eval preprocessing timm itself would use for this model (resolve_data_config)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=tm)
    _, h, w = cfg["input_size"]
    if h != w or cfg.get("crop_mode", "center") not in ("center", "squash"):
        raise HubError(f"unsupported timm preprocessing {cfg}")
    return Preprocessing(image_size=h, crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"],
                         mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                         crop_mode=cfg.get("crop_mode", "center"))


def class_names_from_timm(tm: nn.Module) -> list[str]:
    """ImageNet heads get the human-readable names timm ships; any other head, class_<i>."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    n = tm.num_classes
    pretrained_cfg: dict[str, Any] = getattr(tm, "pretrained_cfg", {}) or {}
    if pretrained_cfg.get("label_descriptions") or pretrained_cfg.get("label_names"):
        names = list(pretrained_cfg.get("label_descriptions") or pretrained_cfg["label_names"])
        if len(names) == n:
            return names
    subset = infer_imagenet_subset(tm)
    if subset:
        names = ImageNetInfo(subset).label_descriptions()
        if len(names) == n:
            return list(names)
    return [f"class_{i}" for i in range(n)]


def load_timm(name: str) -> tuple[VisionTransformer, ModelArtifact]:
    """A timm hub name -> our model with its cached pretrained weights, class names and preprocessing."""
    source = parse_timm_name(name)
    if source is None:
        raise HubError(f"{name!r} is not a timm model name (e.g. vit_small_patch16_224.augreg_in21k_ft_in1k)")
    tm = create_timm_model(source, device="meta")
    config = config_from_timm(tm, name)  # an unsupported variant is refused before any download
    path = cached_file(source.repo_id, source.weight_files)
    tm = create_timm_model(source)
    model = VisionTransformer(config)
    check_same_function(tm, model, name)
    report = load_weights(model, path)
    artifact = ModelArtifact(
        config=config, class_names=class_names_from_timm(tm), preprocessing=preprocessing_from_timm(tm),
        metadata={"source": name, "timm_model": source.model_name, "hf_repo": source.repo_id,
                  "weights_file": path, "loaded": str(report)},
    )
    return model.eval(), artifact


def timm_config(name: str) -> ViTConfig:
    """The ViTConfig of a timm hub name, from timm's definition only (no weights needed)."""
    source = parse_timm_name(name)
    if source is None:
        raise HubError(f"{name!r} is not a timm model name")
    return config_from_timm(create_timm_model(source, device="meta"), name)


def timm_weights_path(name: str) -> str:
    """The cached weight file of a timm hub name (for init_from)."""
    source = parse_timm_name(name)
    if source is None:
        raise HubError(f"{name!r} is not a timm model name")
    return cached_file(source.repo_id, source.weight_files)


__all__ = ["HubError", "TimmSource", "parse_timm_name", "is_timm_name", "cached_file", "load_timm",
           "config_from_timm", "preprocessing_from_timm", "class_names_from_timm", "timm_config",
           "timm_weights_path"]
