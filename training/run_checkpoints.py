"""A vit-train run folder as a model source: its best checkpoint by the metric it monitored.

Reading Lightning's ModelCheckpoint state belongs to the training side (vit_service never reads
Lightning's layouts); `MODEL_FORMATS` is vit_service's format list with run folders in front, what
vit-export, vit-explain and the pointing game load from.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path
import torch

from vit_service.artifact import is_artifact_dir
from vit_service.formats.sources import FORMATS, Loaded, ModelFormat, ModelSourceError, load_checkpoint


class RunError(ModelSourceError):
    """A run folder (or a root of them) cannot answer the question asked; the message names it."""


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
        raise RunError(f"{run_dir}: no checkpoints (expected {ckpt_dir}/*.ckpt from vit-train fit)")
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
        raise RunError(f"{run_dir}: its checkpoints record no monitored metric; pick one with --ckpt")
    sign = 1.0 if candidates[0].mode == "max" else -1.0
    return max(candidates, key=lambda c: sign * c.score)


def _checkpoint_state(path: Path) -> tuple[tuple[int, int, float], dict[str, dict]]:
    try:  # mmap: only the metadata is read, not every tensor
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # any unpickling failure means "not a checkpoint"
        raise RunError(f"{path}: not a readable checkpoint ({e})") from None
    callbacks = {k: v for k, v in (ckpt.get("callbacks") or {}).items() if k.startswith("ModelCheckpoint")}
    return (int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0)), path.stat().st_mtime), callbacks


def _monitor_and_mode(key: str, state: dict) -> tuple[str | None, str]:
    # Lightning keys the callback's state by its settings: "ModelCheckpoint{'monitor': ..., 'mode': ...}".
    try:
        settings = ast.literal_eval(key[len("ModelCheckpoint"):])
    except (ValueError, SyntaxError):
        settings = {}
    return settings.get("monitor") or state.get("monitor"), settings.get("mode", "min")


def _is_run_folder(source: str, arch: str | None) -> bool:
    return Path(source, "checkpoints").is_dir() and not is_artifact_dir(source)


def _load_run(source: str, ema: bool, arch: str | None) -> Loaded:
    best = best_checkpoint(source)
    model, artifact = load_checkpoint(best.path, ema=ema)
    artifact.metadata["selected_by"] = {"monitor": best.monitor, "mode": best.mode, "score": best.score}
    return model, artifact


RUN_FOLDER = ModelFormat("vit-train run folder", _is_run_folder, _load_run)
MODEL_FORMATS: tuple[ModelFormat, ...] = (RUN_FOLDER, *FORMATS)

__all__ = ["RunError", "BestCheckpoint", "best_checkpoint", "RUN_FOLDER", "MODEL_FORMATS"]
