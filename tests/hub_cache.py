"""A Hugging Face cache folder laid out by hand, as `huggingface_hub` writes it, holding randomly
initialised timm weights: hub names resolve with HF_HUB_OFFLINE=1 and no download ever.

    <cache>/models--timm--<name>/refs/main            the snapshot's commit hash
    <cache>/models--timm--<name>/blobs/<sha256>       file contents
    <cache>/models--timm--<name>/snapshots/<hash>/    model.safetensors, config.json (links to blobs)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_env(cache: Path) -> dict[str, str]:
    """Environment for a subprocess that must resolve hub names from `cache` only."""
    return {"HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf_home"), "HF_HUB_OFFLINE": "1"}


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Writes `files` as one snapshot of model repo `repo_id`; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    return snapshot


def cache_timm_model(cache: Path, name: str, seed: int = 0, head_scale: float = 1.0) -> torch.nn.Module:
    """Caches a randomly initialised `timm.create_model(name)` as timm's hub repo would hold it.

    `head_scale` spreads the logits (as trained weights have them), so top-k is decided by the image.
    """
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        model.head.weight.mul_(head_scale)
    tmp = cache.parent / f"{name}.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    cfg = model.pretrained_cfg
    config = {"architecture": cfg["architecture"], "num_classes": model.num_classes,
              "num_features": model.num_features, "global_pool": model.global_pool,
              "pretrained_cfg": {k: v for k, v in cfg.items() if k not in ("architecture", "hf_hub_id")}}
    add_to_cache(cache, cfg["hf_hub_id"], {"model.safetensors": tmp.read_bytes(),
                                           "config.json": json.dumps(config, default=list).encode()})
    tmp.unlink()
    return model
