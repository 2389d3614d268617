"""`vit-train`: the LightningCLI entry point (fit / validate / test / predict)."""

from __future__ import annotations

import sys

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from training.data import ImageFolderDataModule
from training.folder_dataset import DatasetError
from vit_service.formats.checkpoints import CheckpointError
from training.module import ViTClassifier
from training.report import EvaluationReport, TrainingCurves


class ViTCLI(LightningCLI):
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
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-epoch{epoch:03d}-acc{val/acc1:.4f}",
            "checkpoint.auto_insert_metric_name": False,
            # `last.ckpt` is always the latest state (resume with --ckpt_path last), even when
            # the run folder was moved or copied; best-* names carry their epoch.
            "checkpoint.enable_version_counter": False,
        })
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # Plots in the run's folder: the report after validate/test, the curves after fit.
        parser.add_lightning_class_args(EvaluationReport, "report")
        parser.add_lightning_class_args(TrainingCurves, "curves")


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
    except (DatasetError, CheckpointError) as e:
        # A user's data or weights problem: one clear line naming the file, no traceback.
        print(f"vit-train: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
