"""Run folders: `<default_root_dir>/version_N/` holds one run's config.yaml, logs and checkpoints/.

Lightning's own naming (CSVLogger / TensorBoardLogger `version_N`), so `trainer.log_dir` is the run
folder and `ModelCheckpoint` puts `checkpoints/` inside it. This module finds runs and a run's best
checkpoint (`best_checkpoint`, which lives with the model loader that reads run folders); it reads
checkpoints but never trains.
"""

from __future__ import annotations

import os
from pathlib import Path

from vit_service.formats.sources import BestCheckpoint, ModelSourceError, best_checkpoint

RUN_PREFIX = "version_"


# A run folder that cannot answer the question: the model loaders' error, one set of messages.
RunError = ModelSourceError


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


__all__ = ["RUN_PREFIX", "RunError", "BestCheckpoint", "best_checkpoint", "best_checkpoint_under", "run_versions",
           "next_version", "latest_resumable_run"]
