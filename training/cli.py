"""`vit-train`: the LightningCLI entry point (fit / validate / test / predict).

Every output follows `--trainer.default_root_dir` (default `runs`), one folder per run in
Lightning's naming: `<default_root_dir>/version_N/` holds config.yaml, metrics.csv, the TensorBoard
events, checkpoints/ and (predict) predictions.csv; it is `trainer.log_dir`. `fit --ckpt_path last`
continues the newest run that has a last.ckpt, in its own folder.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from training.data import ImageFolderDataModule
from training.folder_dataset import DatasetError
from training.module import ViTClassifier, build_model_config
from training.precision import AUTO, resolve_auto_precision
from training.predict import PredictionFileWriter
from training.progress import ProgressLog
from training.runs import RUN_PREFIX, RunError, best_checkpoint_under, latest_resumable_run, next_version
from training.report import EvaluationReport, TrainingCurves
from vit_service.formats.checkpoints import CheckpointError

log = logging.getLogger(__name__)

DEFAULT_ROOT_DIR = "runs"
RUN_VERSION_ENV = "VIT_TRAIN_RUN_VERSION"
_NEW_RUN_DIRS: list[Path] = []  # run folders this command made (none existed before)


class _NoAdvertisement(logging.Filter):
    """Lightning logs "💡 Tip: ... try installing litlogger ..." (a hosted service) at every start
    without a LitLogger: an advertisement, not information about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoAdvertisement())  # the loggers rank_zero_info writes to


PRECISION_ENV = "VIT_TRAIN_RESOLVED_PRECISION"


class ViTTrainer(Trainer):
    """Lightning's Trainer; its `precision` also accepts "auto", which vit-train resolves (by the
    host: training/precision.py) before building it, so the Trainer itself never sees "auto"."""

    def __init__(self, *, precision: _PRECISION_INPUT | Literal["auto"] | None = None, **kwargs: Any) -> None:
        if precision == AUTO:
            raise ValueError("precision 'auto' is resolved by vit-train (training/cli.py) before the Trainer is "
                             "built; from Python, pass a Lightning precision (e.g. training.precision."
                             "resolve_auto_precision(...).precision)")
        super().__init__(precision=precision, **kwargs)


class ViTCLI(LightningCLI):
    def __init__(self, *args: Any, trainer_class: Any = None, **kwargs: Any) -> None:
        # ViTTrainer by default, so `precision: auto` parses however the CLI is built.
        super().__init__(*args, trainer_class=trainer_class or ViTTrainer, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The class list, and so the head size, and the eval preprocessing come from the data:
        # written once, linked into the model (and from there into the checkpoint and export).
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.preprocessing_config", "model.preprocessing", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size")

        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc1",
            "checkpoint.mode": "max",
            "checkpoint.filename": "best-epoch{epoch:03d}-acc{val/acc1:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            "checkpoint.enable_version_counter": False,  # best-* names carry their epoch
        })
        # `last.ckpt`, the latest state (resume with --ckpt_path last), is a second checkpoint
        # callback without a monitor: since Lightning 2.6 `save_last` writes last.ckpt only when a
        # new best is saved, so it would go stale whenever the metric does not improve.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults({
            "last_checkpoint.filename": "last",
            "last_checkpoint.save_top_k": 1,
            "last_checkpoint.enable_version_counter": False,
        })
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # Plots in the run's folder: the report after validate/test, the curves after fit.
        parser.add_lightning_class_args(EvaluationReport, "report")
        parser.add_lightning_class_args(TrainingCurves, "curves")
        parser.add_lightning_class_args(ProgressLog, "progress")
        parser.add_lightning_class_args(PredictionFileWriter, "predict_writer")
        parser.set_defaults({"trainer.default_root_dir": DEFAULT_ROOT_DIR})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config["trainer"].get("precision") == AUTO:
            config["trainer"]["precision"] = self._resolve_auto_precision(config)

    def _resolve_auto_precision(self, config: Any) -> str:
        """`trainer.precision: auto` -> a Lightning precision, before the Trainer is built; the
        saved config.yaml then holds the resolved value. Rank 0 decides (and prints it, once);
        DDP processes that Lightning starts inherit its choice, so all ranks train alike."""
        inherited = os.environ.get(PRECISION_ENV)
        if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
            return inherited
        model, data = config["model"], config["data"]

        def model_config() -> Any:
            return build_model_config(model["preset"], model.get("num_classes") or 10, model.get("image_size"),
                                      model.get("model_overrides"), model.get("init_from"))

        choice = resolve_auto_precision(config["trainer"].get("accelerator"), model_config,
                                        int(data.get("batch_size") or 32))
        log.info(choice.line())
        os.environ[PRECISION_ENV] = choice.precision
        return choice.precision

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # The loggers are made here, not in the configs, because their folder depends on the run:
        # both write into <default_root_dir>/version_N, and ModelCheckpoint (no dirpath) puts
        # checkpoints/ beside them. Loggers given in a config or on the command line are kept.
        # run=False (objects built from Python, no subcommand): the config is not nested.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config["trainer"]
        if trainer_config.get("logger") in (None, True):
            root = trainer_config.get("default_root_dir") or DEFAULT_ROOT_DIR
            # DDP processes that Lightning starts (LOCAL_RANK > 0) inherit rank 0's choice: by
            # the time they look, rank 0 may have made the folder, and they would pick the next.
            inherited = os.environ.get(RUN_VERSION_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None
            version = int(inherited) if inherited else self._run_version(root, config)  # -> version_N
            os.environ[RUN_VERSION_ENV] = str(version)
            if not inherited and not Path(root, f"{RUN_PREFIX}{version}").exists():
                _NEW_RUN_DIRS.append(Path(root, f"{RUN_PREFIX}{version}"))  # removed if the command fails
            kwargs["logger"] = [ResumableCSVLogger(save_dir=root, name="", version=version),
                                TensorBoardLogger(save_dir=root, name="", version=version)]
        if self.subcommand in ("validate", "test", "predict"):
            # Restoring a checkpoint from another run folder makes ModelCheckpoint warn that its
            # best-score bookkeeping "won't be reloaded": it only matters to a fit that keeps
            # saving, and these commands save nothing, so the warning is noise here.
            warnings.filterwarnings("ignore", message=r"The dirpath has changed from", category=UserWarning)
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # Kept to tell a max_epochs typed on the command line from one that comes from a config.
        self._argv = [str(a) for a in (sys.argv[1:] if args is None else args if isinstance(args, list) else [])]
        super().parse_arguments(parser, args)

    def _run_version(self, root: str, config: Any) -> int:
        """fit --ckpt_path last: the run it resumes. Otherwise a new folder, as Lightning does.
        validate/test/predict: `last` is the newest run's last.ckpt, `best` the best checkpoint of
        all runs under root; the resolved path replaces `last`/`best` in the saved config.yaml."""
        ckpt_path = config.get("ckpt_path")
        if self.subcommand == "fit" and ckpt_path == "last":
            resumed = latest_resumable_run(root)
            if resumed is not None:
                run = f"{root}/{RUN_PREFIX}{resumed}"
                self._check_resume_plan(run, config)
                log.info(f"resuming {run}/checkpoints/last.ckpt")
                return resumed
        elif self.subcommand != "fit" and ckpt_path in ("last", "best"):
            if ckpt_path == "last":
                latest = latest_resumable_run(root)
                if latest is None:
                    raise RunError(f"{root}: no run with checkpoints for --ckpt_path last")
                resolved = f"{root}/{RUN_PREFIX}{latest}/checkpoints/last.ckpt"
                log.info(f"--ckpt_path last: {resolved} (the newest run's latest state)")
            else:
                best, runs = best_checkpoint_under(root)
                resolved = str(best.path)
                log.info(f"--ckpt_path best: {resolved} ({best.monitor} {best.score:.4f}, the best of {runs} "
                      f"run(s) under {root})")
            config["ckpt_path"] = resolved
            if self.subcommand:  # the saved config.yaml says which file was evaluated, not "best"
                self.config[self.subcommand]["ckpt_path"] = resolved
        return next_version(root)

    def _check_resume_plan(self, run: str, config: Any) -> None:
        """The LR schedule (warmup + cosine over max_epochs) is planned when training starts; a
        resumed run with another max_epochs gets a re-planned one. Refused unless max_epochs is
        typed on the command line (then said); a finished run with nothing left to train too."""
        planned = _planned_max_epochs(run)
        requested = config["trainer"].get("max_epochs")
        done = _completed_epochs(f"{run}/checkpoints/last.ckpt")
        if planned is None or requested is None or done is None:
            return
        typed = any(a == "--trainer.max_epochs" or a.startswith("--trainer.max_epochs=") for a in self._argv)
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
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        # "processed": the epoch end ran; last.ckpt is saved there, before "completed" counts it
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except Exception:  # an older or foreign checkpoint: no plan check, Lightning resumes as before
        return None


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; a resumed run appends to it instead."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):  # the resumed run's columns come first
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])

    def _check_log_dir_exists(self) -> None:
        pass


class ResumableCSVLogger(CSVLogger):
    """CSVLogger that keeps the metrics of the run it resumes (same version folder)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def run_cli(args: list[str] | None = None) -> ViTCLI:
    return ViTCLI(
        ViTClassifier,
        ImageFolderDataModule,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},  # the resolved config is saved beside every run
        auto_configure_optimizers=False,
        args=args,
    )


def main() -> None:
    try:
        run_cli()
    except (DatasetError, CheckpointError, RunError) as e:
        # A user's data or weights problem: one clear line naming the file, no traceback.
        _remove_failed_run_dirs()
        print(f"vit-train: error: {e}", file=sys.stderr)
        sys.exit(2)


def _remove_failed_run_dirs() -> None:
    """A command refused before it trained or evaluated anything leaves no version_N behind (only
    the config.yaml and empty logs it started); a folder with checkpoints or a report is kept."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    for run in _NEW_RUN_DIRS:
        kept = {"config.yaml", "hparams.yaml", "metrics.csv"}
        files = [f for f in run.rglob("*") if f.is_file()]
        if all(f.name in kept or f.name.startswith("events.out.tfevents") for f in files):
            shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
