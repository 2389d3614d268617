"""Run folders: `<default_root_dir>/version_N/` holds one run's config.yaml, logs and checkpoints/.

Lightning's own naming (CSVLogger / TensorBoardLogger `version_N`), so `trainer.log_dir` is the run
folder and `ModelCheckpoint` puts `checkpoints/` inside it. This module finds runs and a run's best
checkpoint; it reads checkpoints but never trains.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

import torch

RUN_PREFIX = "version_"


class RunError(ValueError):
    """A run folder that cannot answer the question; the message names the folder."""


def run_versions(root: str | os.PathLike[str]) -> list[int]:
    """The N of every `version_N` folder under root, ascending."""
    if not os.path.isdir(root):
        return []
    names = (e.name for e in os.scandir(root) if e.is_dir() and e.name.startswith(RUN_PREFIX))
    return sorted(int(n[len(RUN_PREFIX):]) for n in names if n[len(RUN_PREFIX):].isdigit())


def next_version(root: str | os.PathLike[str]) -> int:
    versions = run_versions(root)
    return versions[-1] + 1 if versions else 0


def latest_resumable_run(root: str | os.PathLike[str]) -> int | None:
    """The newest version_N under root that has checkpoints/last.ckpt (what `--ckpt_path last` resumes)."""
    for version in reversed(run_versions(root)):
        if (Path(root) / f"{RUN_PREFIX}{version}" / "checkpoints" / "last.ckpt").is_file():
            return version
    return None


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
        for path, score in (state.get("best_k_models") or {}).items():
            local = ckpt_dir / Path(path).name
            if local.is_file():
                candidates.append(BestCheckpoint(local, monitor, mode, float(score)))
    if not candidates:
        raise RunError(f"{run_dir}: its checkpoints record no monitored metric; pick one with --ckpt")
    sign = 1.0 if candidates[0].mode == "max" else -1.0
    return max(candidates, key=lambda c: sign * c.score)


def best_checkpoint_under(root: str | os.PathLike[str]) -> tuple[BestCheckpoint, int]:
    """The best checkpoint of all runs under root (each run's best, compared by the metric they
    monitored), and how many runs were compared: what `--ckpt_path best` evaluates. The runs of one
    root are one experiment (same data), so their scores compare; runs monitoring different
    metrics do not, and are an error."""
    bests: list[BestCheckpoint] = []
    for version in run_versions(root):
        run = Path(root) / f"{RUN_PREFIX}{version}"
        if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("*.ckpt")):
            try:
                bests.append(best_checkpoint(run))
            except RunError:
                continue  # e.g. only a last.ckpt without a monitored metric
    if not bests:
        raise RunError(f"{root}: no run with a best checkpoint for --ckpt_path best (train one with vit-train fit)")
    kinds = {(b.monitor, b.mode) for b in bests}
    if len(kinds) > 1:
        raise RunError(f"{root}: its runs monitored different metrics ({sorted(kinds)}), so 'best' is ambiguous; "
                       "give a checkpoint path with --ckpt_path")
    sign = 1.0 if bests[0].mode == "max" else -1.0
    return max(bests, key=lambda b: sign * b.score), len(bests)


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
