"""One test per Lightning workaround in `training/lightning_compat.py`: what it relies on is still
there, and the upstream bug it works around still exists (when this fails because Lightning fixed
it, delete the workaround and this test)."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.fit_loop import _FitLoop

from tests.test_shards import BATCH, _fit, _KillAtStep, _RecordIds, shards  # noqa: F401


class _AsksForStepCount(_RecordIds):
    """Asks Lightning for the step count in configure_optimizers, as a cosine schedule does."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.trainer.estimated_stepping_batches == 18
        return super().configure_optimizers()


def test_lightning_still_drops_the_loader_state_after_an_early_step_count(shards: Path, tmp_path: Path) -> None:
    # Lightning #20550: without the workaround, a run resumed at step 6 of 18 replays the epoch
    # from its start (the checkpoint's LitData position is never loaded).
    every = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="{step}")
    first = _fit(shards, tmp_path, [every, _KillAtStep(9)], module=lambda class_names: _AsksForStepCount())
    resumed = _fit(shards, tmp_path, [], ckpt_path=str(tmp_path / "step=6.ckpt"),
                   module=lambda class_names: _AsksForStepCount())
    assert len(resumed.seen) == 12 * BATCH  # the right number of steps ...
    assert resumed.seen[:6 * BATCH] == first.seen[:6 * BATCH], (
        "Lightning now restores the loader state after an early estimated_stepping_batches: "
        "remove training/lightning_compat.estimated_stepping_batches")  # ... but the epoch's first samples again


def test_the_fit_loop_attributes_the_workaround_uses_exist() -> None:
    loop = _FitLoop(L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False))
    assert loop._combined_loader is None  # setup_data() builds the loader while this is None
    assert loop._combined_loader_states_to_load == []  # the checkpoint's loader states wait here
    loop.on_load_checkpoint({"combined_loader": [{"x": 1}]})  # what restore_training_state() calls
    assert loop._combined_loader_states_to_load == [{"x": 1}]


def test_lightnings_csv_writer_still_deletes_an_existing_metrics_file(tmp_path: Path) -> None:
    # No append option upstream: ResumableCSVLogger's writer skips `_check_log_dir_exists`, which
    # is what removes a resumed run's metrics.csv.
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    (tmp_path / "metrics.csv").write_text("epoch,val/acc1\n0,0.5\n")
    ExperimentWriter(str(tmp_path))
    assert not (tmp_path / "metrics.csv").exists(), (
        "Lightning's ExperimentWriter keeps metrics.csv now: check whether training/lightning_compat._AppendingWriter "
        "is still needed")


def test_the_resumable_csv_logger_appends_to_a_resumed_run(tmp_path: Path) -> None:
    from training.lightning_compat import ResumableCSVLogger

    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_0" / "metrics.csv").write_text("epoch,val/acc1\n0,0.5\n")
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="", version=0)
    logger.log_metrics({"epoch": 1, "val/acc1": 0.75}, step=1)
    logger.save()
    with open(tmp_path / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["val/acc1"]) for r in rows] == [("0", "0.5"), ("1", "0.75")]  # the resumed row kept


def test_the_private_precision_type_is_still_there() -> None:
    from typing import get_args

    from training.lightning_compat import PrecisionInput

    assert "bf16-mixed" in get_args(PrecisionInput) or any("bf16-mixed" in get_args(a) for a in get_args(PrecisionInput))


def test_lightning_still_builds_the_deprecated_leafspec() -> None:
    """hide_lightning_pytree_warning filters torch's FutureWarning for Lightning's LeafSpec: still
    needed while Lightning's _pytree builds one (fails once it does not: then remove the filter)."""
    import inspect

    import lightning.pytorch.utilities._pytree as lightning_pytree

    assert "LeafSpec()" in inspect.getsource(lightning_pytree)


def test_jsonargparse_still_wraps_a_three_member_optional_in_optional_again() -> None:
    """One cause keep_trainer_counts_integers works around (fails once jsonargparse knows such hints)."""
    from typing import Optional, Union

    from jsonargparse._typehints import is_optional

    assert is_optional(Optional[Union[int, float]], object) is False


def test_lightning_imported_after_nncf_still_gets_float_first_count_hints() -> None:
    """The other cause: typing hands trainer.py fabric.py's `Optional[Union[float, int]]` (fails
    once that stops: then keep_trainer_counts_integers' reordering can go)."""
    import subprocess
    import sys

    code = ("import inspect, nncf\nfrom lightning.pytorch import Trainer\n"
            "print(inspect.signature(Trainer.__init__).parameters['limit_val_batches'].annotation)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "typing.Union[float, int, NoneType]", out.stderr[-2000:]


def test_limit_val_batches_1_stays_one_batch_whatever_the_process_made_before(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways a process turns `--trainer.limit_val_batches 1` into 1.0 (all of validation): the
    Trainer's hint float first (as after `import nncf`) and an equal float-first union in typing's
    cache. vit-train still parses one batch."""
    import inspect
    from typing import Optional, Union, get_args

    from training.cli import run_cli

    hints = inspect.unwrap(L.Trainer.__init__).__annotations__
    for name, hint in list(hints.items()):  # every int-or-float hint float first, as after `import nncf`
        if {int, float} <= set(get_args(hint)):
            monkeypatch.setitem(hints, name, Union[(float, int, *(m for m in get_args(hint) if m not in (int, float)))])
    reordered = Optional[Union[float, int, None]]  # noqa: F841 (kept in typing's cache)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--data.train_dir", str(tmp_path), "--trainer.limit_val_batches", "1", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["limit_val_batches"] == 1 and type(printed["trainer"]["limit_val_batches"]) is int
