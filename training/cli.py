"""`vit-train`: the LightningCLI entry point (fit / validate / test / predict).

Every output follows `--trainer.default_root_dir` (default `runs`), one folder per run in
Lightning's naming: `<default_root_dir>/version_N/` holds config.yaml, metrics.csv, the TensorBoard
events, checkpoints/ and (predict) predictions.csv; it is `trainer.log_dir`. `fit --ckpt_path last`
continues the newest run that has a last.ckpt, in its own folder.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Literal

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from training.data import ImageFolderDataModule
from training.folder_dataset import DatasetError
from training.lightning_compat import PrecisionInput, hide_lightning_pytree_warning, keep_trainer_counts_integers
from training.module import ViTClassifier
from training.precision import AUTO, PRECISION_ENV, resolve_config_precision
from training.predict import PredictionFileWriter
from training.progress import ProgressLog, hide_lightning_tips
from training.report import EvaluationReport, TrainingCurves
from training.runs import RunError, RunFolders
from vit_service.formats.checkpoints import CheckpointError

DEFAULT_ROOT_DIR = "runs"


hide_lightning_tips()
hide_lightning_pytree_warning()


class ViTTrainer(Trainer):
    """Lightning's Trainer; its `precision` also accepts "auto", which vit-train resolves (by the
    host: training/precision.py) before building it, so the Trainer itself never sees "auto"."""

    def __init__(self, *, precision: PrecisionInput | Literal["auto"] | None = None, **kwargs: Any) -> None:
        if precision == AUTO:
            raise ValueError("precision 'auto' is resolved by vit-train (training/cli.py) before the Trainer is "
                             "built; from Python, pass a Lightning precision (e.g. training.precision."
                             "resolve_auto_precision(...).precision)")
        super().__init__(precision=precision, **kwargs)


class ViTCLI(LightningCLI):
    def __init__(self, *args: Any, trainer_class: Any = None, run_folders: RunFolders | None = None,
                 **kwargs: Any) -> None:
        self.run_folders = run_folders or RunFolders()  # set before parsing: instantiation uses it
        keep_trainer_counts_integers()  # else --trainer.limit_val_batches 1 may parse as 1.0 (lightning_compat.py)
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
        saved config.yaml then holds the resolved value."""
        return resolve_config_precision(config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # The loggers are made here, not in the configs, because their folder depends on the run
        # (training/runs.py): both write into <default_root_dir>/version_N, and ModelCheckpoint (no
        # dirpath) puts checkpoints/ beside them. Loggers given in a config or on the command line
        # are kept. run=False (objects built from Python, no subcommand): the config is not nested.
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config["trainer"]
        if trainer_config.get("logger") in (None, True):
            root = trainer_config.get("default_root_dir") or DEFAULT_ROOT_DIR
            typed = any(a == "--trainer.max_epochs" or a.startswith("--trainer.max_epochs=") for a in self._argv)
            run = self.run_folders.open(root, self.subcommand, config.get("ckpt_path"),
                                        trainer_config.get("max_epochs"), typed)
            if run.ckpt_path and self.subcommand != "fit":  # fit finds "last" itself, in the run's checkpoints/
                config["ckpt_path"] = run.ckpt_path
            if run.ckpt_path and self.subcommand:  # the saved config.yaml names the file, not "last"/"best"
                self.config[self.subcommand]["ckpt_path"] = run.ckpt_path
            kwargs["logger"] = RunFolders.loggers(root, run.version)
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


def run_cli(args: list[str] | None = None, run_folders: RunFolders | None = None) -> ViTCLI:
    return ViTCLI(
        ViTClassifier,
        ImageFolderDataModule,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},  # the resolved config is saved beside every run
        auto_configure_optimizers=False,
        args=args,
        run_folders=run_folders,
    )


def main() -> None:
    run_folders = RunFolders()
    try:
        run_cli(run_folders=run_folders)
    except (DatasetError, CheckpointError, RunError) as e:
        # A user's data or weights problem: one clear line naming the file, no traceback.
        run_folders.remove_failed()
        print(f"vit-train: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
