"""Run folders: `<default_root_dir>/version_N/` holds one run's config.yaml, logs and checkpoints/.

Lightning's own naming (CSVLogger / TensorBoardLogger `version_N`), so `trainer.log_dir` is the run
folder and `ModelCheckpoint` puts `checkpoints/` inside it. Everything vit-train decides about run
folders is here: which version_N a command writes (a new one, or the run `--ckpt_path last`
resumes), whether resuming is allowed, what `last` / `best` name, the loggers, and removing a
folder a failed command made. A run's best checkpoint is read from Lightning's ModelCheckpoint
state in `training/run_checkpoints.py`.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from training.lightning_compat import ResumableCSVLogger
from training.run_checkpoints import BestCheckpoint, RunError, best_checkpoint

log = logging.getLogger(__name__)

RUN_PREFIX = "version_"
RUN_VERSION_ENV = "VIT_TRAIN_RUN_VERSION"


def rank_zero_decides(env: str, decide: Callable[[], str]) -> str:
    """Rank 0's decision, the same in every process: DDP processes that Lightning starts
    (LOCAL_RANK > 0) inherit it through the environment `env` instead of deciding again (by the
    time they look, rank 0 may have made the folder it chose, and they would pick the next)."""
    inherited = os.environ.get(env) if os.environ.get("LOCAL_RANK", "0") != "0" else None
    value = inherited or decide()
    os.environ[env] = value
    return value


@dataclass(frozen=True)
class Run:
    version: int  # the N of the version_N this command writes
    ckpt_path: str | None  # the file `--ckpt_path last/best` resolved to, for the saved config.yaml


class RunFolders:
    """The run folders of one vit-train command: the one it writes, and those it made."""

    def __init__(self) -> None:
        self.made: list[Path] = []  # run folders this command made (none existed before)

    def open(self, root: str, subcommand: str | None, ckpt_path: str | None, max_epochs: int | None,
             max_epochs_typed: bool) -> Run:
        """The run this command writes into, chosen once by rank 0; the DDP processes it starts
        inherit the version (and resolve no `last` / `best` themselves)."""
        resolved: str | None = None

        def choose() -> str:
            nonlocal resolved
            version, resolved = self._choose(root, subcommand, ckpt_path, max_epochs, max_epochs_typed)
            if not Path(root, f"{RUN_PREFIX}{version}").exists():
                self.made.append(Path(root, f"{RUN_PREFIX}{version}"))  # removed if the command fails
            return str(version)

        version = int(rank_zero_decides(RUN_VERSION_ENV, choose))
        return Run(version, resolved)

    @staticmethod
    def loggers(root: str, version: int) -> list[Logger]:
        """metrics.csv (appended to when resuming) and TensorBoard events, both in version_N."""
        return [ResumableCSVLogger(save_dir=root, name="", version=version),
                TensorBoardLogger(save_dir=root, name="", version=version)]

    def remove_failed(self) -> None:
        """A command refused before it trained or evaluated anything leaves no version_N behind (only
        the config.yaml and empty logs it started); a folder with checkpoints or a report is kept."""
        if os.environ.get("LOCAL_RANK", "0") != "0":
            return
        kept = {"config.yaml", "hparams.yaml", "metrics.csv"}
        for run in self.made:
            files = [f for f in run.rglob("*") if f.is_file()]
            if all(f.name in kept or f.name.startswith("events.out.tfevents") for f in files):
                shutil.rmtree(run, ignore_errors=True)

    def _choose(self, root: str, subcommand: str | None, ckpt_path: str | None, max_epochs: int | None,
                max_epochs_typed: bool) -> tuple[int, str | None]:
        """fit --ckpt_path last: the run it resumes. Otherwise a new folder, as Lightning does.
        validate/test/predict: `last` is the newest run's last.ckpt, `best` the best checkpoint of
        all runs under root; the resolved path replaces `last`/`best` in the saved config.yaml."""
        if subcommand == "fit" and ckpt_path == "last":
            resumed = latest_resumable_run(root)
            if resumed is None:  # Lightning would start a fresh run with a misleading hint
                raise RunError(f"{root}: no run to resume with --ckpt_path last (no {RUN_PREFIX}N/checkpoints/"
                               f"last.ckpt under it); check --trainer.default_root_dir, or start a new run "
                               f"without --ckpt_path")
            run = f"{root}/{RUN_PREFIX}{resumed}"
            check_resume_plan(run, max_epochs, max_epochs_typed)
            log.info(f"resuming {run}/checkpoints/last.ckpt")
            # Resuming writes into the run's own checkpoints/ by design: Lightning's warning
            # that the folder "exists and is not empty" is about a new run overwriting an old one.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            return resumed, f"{run}/checkpoints/last.ckpt"  # config.yaml names the file resumed
        elif subcommand != "fit" and ckpt_path == "last":
            latest = latest_resumable_run(root)
            if latest is None:
                raise RunError(f"{root}: no run with checkpoints for --ckpt_path last")
            resolved = f"{root}/{RUN_PREFIX}{latest}/checkpoints/last.ckpt"
            log.info(f"--ckpt_path last: {resolved} (the newest run's latest state)")
            return next_version(root), resolved
        elif subcommand != "fit" and ckpt_path == "best":
            best, runs = best_checkpoint_under(root)
            log.info(f"--ckpt_path best: {best.path} ({best.monitor} {best.score:.4f}, the best of {runs} "
                     f"run(s) under {root})")
            return next_version(root), str(best.path)
        return next_version(root), None


def check_resume_plan(run: str, requested: int | None, typed: bool) -> None:
    """The LR schedule (warmup + cosine over max_epochs) is planned when training starts; a
    resumed run with another max_epochs gets a re-planned one. Refused unless max_epochs is
    typed on the command line (then said); a finished run with nothing left to train too."""
    planned = _planned_max_epochs(run)
    done = _completed_epochs(f"{run}/checkpoints/last.ckpt")
    if planned is None or requested is None or done is None:
        return
    extend = (f"to train it longer, add --trainer.max_epochs N (N > {done}): its warmup + cosine LR "
              f"schedule is then re-planned for N epochs, so the LR rises again from where it had decayed")
    if requested <= done:
        raise RunError(f"{run} has already trained {done} epoch(s) (max_epochs {requested}): nothing to resume; "
                       f"{extend}; or start a new run without --ckpt_path")
    if requested != planned and not typed:
        state = "finished" if done >= planned else f"{done} done"
        as_planned = f"--trainer.max_epochs {planned} to resume as planned, or " if done < planned else ""
        raise RunError(f"{run} was planned for {planned} epochs ({state}) but max_epochs is {requested} "
                       f"here (from the config): resuming would silently re-plan its LR schedule for "
                       f"{requested} epochs. Add {as_planned}--trainer.max_epochs {requested} to re-plan on "
                       f"purpose, or start a new run without --ckpt_path")
    if requested != planned:
        log.info(f"note: re-planning the LR schedule of {run} from {planned} to {requested} epochs ({done} done): "
                 f"warmup and cosine decay are recomputed over {requested} epochs, so the LR jumps from the "
                 f"old schedule's value to the new one's at epoch {done}")


def _planned_max_epochs(run: str) -> int | None:
    """trainer.max_epochs in the run's saved config.yaml (the plan its LR schedule was made for)."""
    try:
        saved = yaml.safe_load(Path(run, "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    value = (saved.get("trainer") or {}).get("max_epochs")
    return int(value) if isinstance(value, int) and value > 0 else None


def _completed_epochs(ckpt: str) -> int | None:
    """Epochs fully trained when `ckpt` was saved (Lightning's fit-loop progress)."""
    try:
        state: Any = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        # "processed": the epoch end ran; last.ckpt is saved there, before "completed" counts it
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except Exception:  # an older or foreign checkpoint: no plan check, Lightning resumes as before
        return None


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


__all__ = ["RUN_PREFIX", "Run", "RunError", "RunFolders", "BestCheckpoint", "best_checkpoint",
           "best_checkpoint_under", "check_resume_plan", "rank_zero_decides", "run_versions", "next_version",
           "latest_resumable_run"]
