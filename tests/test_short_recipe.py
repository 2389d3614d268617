"""The 30-minute CIFAR-10 recipe: its config runs, and its time-budget and progressive-resize
callbacks do what configs/cifar10_30min.yaml relies on, in real `vit-train fit` runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, eval_logits, macro_accuracy, run_cli_in_process
from training.callbacks import ProgressiveResize, TimeBudget

RECIPE = REPO / "configs/cifar10_30min.yaml"


def _recipe_on(demo_data: Path, run_dir: Path, callbacks: list[dict] | None = None) -> Path:
    """configs/cifar10_30min.yaml on the small demo set (its images are resized to 32 px)."""
    cfg = yaml.safe_load(RECIPE.read_text())
    cfg["data"].update(train_dir=str(demo_data / "train"), val_dir=str(demo_data / "val"),
                       test_dir=str(demo_data / "val"), batch_size=8, num_workers=0)
    cfg["trainer"].update(default_root_dir=str(run_dir), enable_progress_bar=False)
    if callbacks is not None:
        cfg["trainer"]["callbacks"] = callbacks
    path = run_dir / "recipe.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_recipe_fast_dev_run(demo_data: Path, tmp_path: Path) -> None:
    result = run_cli_in_process("vit-train", "fit", "--config", str(_recipe_on(demo_data, tmp_path)),
                                "--trainer.fast_dev_run", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time budget: 30 min of training" in result.stdout
    assert "progressive resize: training at 16 px" in result.stdout


def test_budget_stops_training_and_validates_once(demo_data: Path, tmp_path: Path) -> None:
    # A budget of 0.6 s ends the run long before the config's 1000 epochs, and the final
    # validation runs although the config validates only every 1000 epochs.
    callbacks = [
        {"class_path": "training.callbacks.TimeBudget", "init_args": {"minutes": 0.01}},
        {"class_path": "training.callbacks.ProgressiveResize", "init_args": {"schedule": [[0.0, 16], [0.5, 32]]}},
        {"class_path": "tests.training_probe.TrainingProbe", "init_args": {"out_dir": str(tmp_path)}},
    ]
    # bf16-mixed as given (the config's `auto` measures, and may pick fp32 on a busy or older CPU).
    result = run_cli_in_process("vit-train", "fit", "--config", str(_recipe_on(demo_data, tmp_path, callbacks)),
                                "--trainer.precision", "bf16-mixed")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time budget spent after" in result.stdout
    last = max(tmp_path.rglob("last*.ckpt"), key=lambda f: f.stat().st_mtime)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    steps_per_epoch = 72 // 8  # 6 classes x 12 training images, batch 8
    assert 1 <= ckpt["global_step"] < 1000 * steps_per_epoch
    # Validated exactly once (no sanity check counted), at the end: one val row in metrics.csv.
    with open(last.parent.parent / "metrics.csv") as f:
        val_rows = [r for r in csv.DictReader(f) if r.get("val/acc1")]
    assert len(val_rows) == 1
    (probe_val,) = json.loads((tmp_path / "rank0.json").read_text())["val_metrics"]
    # The recorded score is the real one: the checkpoint's model over the whole val folder, here,
    # under the same bf16 autocast as the run.
    logits, y = eval_logits(last, bf16=True)
    assert ckpt["vit_service"]["val_acc1"] == pytest.approx(macro_accuracy(logits, y), abs=1e-6)
    assert float(val_rows[0]["val/acc1"]) == pytest.approx(ckpt["vit_service"]["val_acc1"], abs=1e-6)
    assert probe_val["val/acc1"] == pytest.approx(ckpt["vit_service"]["val_acc1"], abs=1e-6)
    # --trainer.precision bf16-mixed really trained under autocast: block 0's first MLP layer computed in bf16.
    dtypes = json.loads((tmp_path / "rank0.json").read_text())["block0_dtypes"]
    assert dtypes and set(dtypes) == {"torch.bfloat16"}


def test_time_budget_schedule_warms_up_peaks_and_ends_at_min() -> None:
    cb = TimeBudget(minutes=10, warmup_fraction=0.1, min_lr_ratio=0.01)
    values = [cb.lr_factor(i / 100) for i in range(101)]
    assert values[0] < values[5] < values[9] < 1.0
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[100] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="minutes"):
        TimeBudget(minutes=0)


def test_time_budget_is_lightnings_timer_and_resumes_its_clock() -> None:
    from lightning.pytorch.callbacks import Timer

    cb = TimeBudget(minutes=2)
    assert isinstance(cb, Timer) and cb.budget_s == 120
    state = {"time_elapsed": {"train": 60.0, "validate": 0.0, "test": 0.0}}  # Timer.state_dict() of a run 1 min in
    cb.load_state_dict(state)
    assert cb.time_elapsed() == pytest.approx(60.0)  # the resumed run continues the same budget
    assert cb.state_dict()["time_elapsed"]["train"] == pytest.approx(60.0)


def test_progressive_resize_schedule() -> None:
    cb = ProgressiveResize([[0.6, 32], [0.0, 16], [0.3, 24]])  # any order
    assert [cb.size_at(p) for p in (0.0, 0.29, 0.3, 0.59, 0.6, 1.0)] == [16, 16, 24, 24, 32, 32]
    assert ProgressiveResize([[0.5, 24]]).size_at(0.1) is None  # full size until the first entry


def test_progressive_resize_sizes_must_be_multiples_of_the_patch_size() -> None:
    from training.module import ViTClassifier

    module = ViTClassifier(preset="vit_cifar_patch4_32", num_classes=10)  # 4 px patches
    module.configure_model()
    ProgressiveResize([[0.0, 16], [0.5, 32]]).on_fit_start(None, module)  # multiples: accepted
    with pytest.raises(ValueError, match=r"^ProgressiveResize sizes \[18, 30\] are not multiples of the patch size 4$"):
        ProgressiveResize([[0.0, 18], [0.3, 24], [0.5, 30]]).on_fit_start(None, module)
    # a module without a ViT (another LightningModule): nothing to check against
    import lightning as L

    ProgressiveResize([[0.0, 17]]).on_fit_start(None, L.LightningModule())


def test_progressive_resize_downscales_the_batch_in_place_with_antialiasing() -> None:
    import lightning as L
    import torch.nn.functional as F

    budget = TimeBudget(minutes=1)  # its share of the budget is 0 before training: the schedule's start
    trainer = L.Trainer(callbacks=[budget], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    cb = ProgressiveResize([[0.0, 16], [0.5, 32]])
    images = torch.rand(2, 3, 32, 32)
    batch = [images.clone(), torch.tensor([0, 1])]
    cb.on_train_batch_start(trainer, None, batch, 0)
    expected = F.interpolate(images, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(batch[0], expected, rtol=0, atol=0)  # the list training_step receives
    assert cb.current_size == 16 and batch[1].tolist() == [0, 1]
    small = batch[0]
    cb.on_train_batch_start(trainer, None, batch, 1)
    assert batch[0] is small  # already at the size: left as it is
    later = ProgressiveResize([[0.5, 16]])  # before the first entry: the full size
    full = [images.clone(), torch.tensor([0, 1])]
    later.on_train_batch_start(trainer, None, full, 0)
    assert torch.equal(full[0], images) and later.current_size is None
    with pytest.raises(TypeError, match=r"^ProgressiveResize needs \[images, labels\] list batches, got tuple$"):
        cb.on_train_batch_start(trainer, None, (images, torch.tensor([0, 1])), 0)


def test_time_budget_progress_is_a_share_capped_at_one_and_a_stop_by_another_is_not_its_own() -> None:
    import lightning as L

    budget = TimeBudget(minutes=1)
    trainer = L.Trainer(callbacks=[budget], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    budget.on_train_start(trainer, None)
    assert isinstance(budget.progress(), float) and 0.0 <= budget.progress() < 0.01  # a share from the start
    budget.load_state_dict({"time_elapsed": {"train": 90.0, "validate": 0.0, "test": 0.0}})  # 1.5 budgets in
    budget.on_train_start(trainer, None)
    budget.on_train_batch_start(trainer, None, [], 0)
    assert budget.progress() == 1.0  # spent: the schedule's end, never beyond
    trainer.should_stop = True  # something else (another callback, a signal) stopped the run
    budget.on_train_batch_end(trainer, None, None, [], 0)
    assert budget.train_s is None  # not the budget's stop: no budget figure recorded
    trainer.should_stop = False
    budget.on_train_batch_end(trainer, None, None, [], 0)
    assert trainer.should_stop and budget.train_s == pytest.approx(90.0, abs=1.0)  # the budget's own stop


def _fit_boring(callbacks: list, batches: int = 4, **trainer_args: object):
    """A real Lightning fit of Lightning's own BoringModel (a linear layer on random data, SGD with a StepLR
    schedule): `batches` batches an epoch."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = L.Trainer(callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_train_batches=batches, limit_val_batches=1,
                        check_val_every_n_epoch=5, **trainer_args)
    trainer.fit(BoringModel())
    return trainer


def test_training_progress_is_the_share_of_steps_without_a_budget() -> None:
    from lightning.pytorch.callbacks import Callback

    from training.callbacks.time_budget import training_progress

    seen: list[float] = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            seen.append(training_progress(trainer))

    _fit_boring([Probe()], max_steps=8)  # 2 epochs of 4
    assert seen == [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875]
    seen.clear()
    _fit_boring([Probe()], max_epochs=-1, max_steps=-1, max_time={"seconds": 0.5})  # no end in steps: 0
    assert seen and set(seen) == {0.0}


def test_a_spent_budget_stops_after_the_step_validates_and_says_when(caplog) -> None:
    import logging

    import warnings

    budget = TimeBudget(minutes=1e-7)  # 6 microseconds: spent by the end of the first step
    with caplog.at_level(logging.INFO, logger="training.callbacks.time_budget"), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit_boring([budget], max_epochs=10)
    # the budget steps the schedule before the step's optimizer, on purpose: PyTorch's warning is silenced
    assert not [w for w in caught if "lr_scheduler.step()` before" in str(w.message)]
    assert trainer.global_step == 1 and budget.train_s is not None and budget.train_s > 0
    assert trainer.check_val_every_n_epoch == 1  # the stopping epoch validates although the run said every 5
    assert "time budget spent after 0.25 epochs (1 steps)" in caplog.text
    assert "Time limit reached" not in caplog.text  # Timer's own line (verbose) would say it twice
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="training.callbacks.time_budget"):
        _fit_boring([TimeBudget(minutes=1e-7)], batches=1, max_epochs=10)
    assert "time budget spent after 1.00 epochs (1 steps)" in caplog.text


def test_callbacks_start_empty_and_refuse_settings_they_cannot_follow() -> None:
    resize = ProgressiveResize([[0.0, 16]])
    assert resize.current_size is None
    with pytest.raises(ValueError, match=r"^ProgressiveResize needs at least one \[progress, size\] entry$"):
        ProgressiveResize([])
    budget = TimeBudget(minutes=2)
    assert budget.progress() == 0.0 and budget.train_s is None and budget.budget_s == 120
    assert budget.lr_factor(0.0) == pytest.approx(1e-3)  # warmup starts at 1e-3 x the peak, not at 0
    assert budget.lr_factor(1.0) == pytest.approx(0.01)  # the default floor
    assert TimeBudget(minutes=2, warmup_fraction=0.0).lr_factor(0.0) == pytest.approx(1.0)  # no warmup
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^warmup_fraction must be in \[0, 1\), got {bad}$"):
            TimeBudget(minutes=2, warmup_fraction=bad)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"^TimeBudget minutes must be positive, got {bad}$"):
            TimeBudget(minutes=bad)
