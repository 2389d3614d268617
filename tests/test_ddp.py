"""Lightning DDP with 2 CPU processes (gloo) through the real `vit-train`: the LR scales with the
global batch, both ranks end validation with the same metrics, those of the full val set, and a
wall-clock budget gives every rank the same LR schedule and the same last step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, demo_config, eval_logits, macro_accuracy, run_cli


def _full_set_metrics(ckpt_path: Path) -> dict[str, float]:
    """val/acc1, val/acc5 (macro: the mean of per-class recalls) and val/loss over the whole val
    folder, in this one process, from the checkpoint saved after that validation."""
    logits, y = eval_logits(ckpt_path)
    return {"val/acc1": macro_accuracy(logits, y, 1), "val/acc5": macro_accuracy(logits, y, 5),
            "val/loss": float(F.cross_entropy(logits, y))}


@pytest.mark.slow  # two DDP processes (~40 s); the DDP time-budget test stays fast
def test_ddp_two_cpu_processes_sync_metrics(demo_data: Path, tmp_path: Path) -> None:
    probe = [{"class_path": "tests.training_probe.TrainingProbe", "init_args": {"out_dir": str(tmp_path)}}]
    config = demo_config(tmp_path, demo_data, callbacks=probe, limit_train_batches=3, max_epochs=1)
    result = run_cli(
        "vit-train", "fit", "--config", str(config), "--trainer.strategy", "ddp",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.batch_size", "8",
        env={"PYTHONPATH": str(REPO)},  # both ranks import the probe from tests/
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("version_*")) == ["version_0"]  # one run folder for both ranks
    ckpt_path = tmp_path / "version_0/checkpoints/last.ckpt"
    assert torch.load(ckpt_path, map_location="cpu", weights_only=False)["global_step"] == 3
    assert "optimizer: AdamW, global batch 16" in result.stdout  # 8 per process x 2 processes
    # Each message once per run, not once per process (rank zero logs).
    assert result.stdout.count("optimizer: AdamW") == 1, result.stdout

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # configs/demo.yaml: lr 1e-3 for a batch of 32, so 5e-4 for 16; 3 steps, 2 of them warmup.
    peak = 1e-3 * 16 / 32
    for r in ranks:
        assert [lrs[0] for lrs in r["step_lrs"]] == pytest.approx([peak / 3, 2 * peak / 3, peak], rel=1e-6)
    (rank0,), (rank1,) = (r["val_metrics"] for r in ranks)  # one validation (sanity check excluded)
    full = _full_set_metrics(ckpt_path)
    for key, value in full.items():
        # Each rank validated half of the 24 images; synced, both report the full-set value.
        assert rank0[key] == pytest.approx(value, abs=1e-5), key
        assert rank1[key] == pytest.approx(value, abs=1e-5), key


def test_ddp_time_budget_one_schedule_for_all_ranks(demo_data: Path, tmp_path: Path) -> None:
    # A 3 s budget on a step clock: every training step "takes" 0.25 s, so rank 0's budget is
    # spent after exactly 12 steps whatever the machine's load. Rank 1's clock runs half the budget
    # (1.5 s) ahead: on its own it would use other LRs than rank 0 and stop after 6 steps, leaving
    # rank 0 waiting in the gradient all-reduce.
    callbacks = [
        {"class_path": "tests.training_probe.SkewedTimeBudget",
         "init_args": {"minutes": 0.05, "skew_s": 1.5, "step_s": 0.25}},
        {"class_path": "tests.training_probe.TrainingProbe", "init_args": {"out_dir": str(tmp_path)}},
    ]
    config = demo_config(tmp_path, demo_data, callbacks=callbacks, max_epochs=1000, check_val_every_n_epoch=1000)
    result = run_cli(
        "vit-train", "fit", "--config", str(config), "--trainer.strategy", "ddp",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.batch_size", "8",
        env={"PYTHONPATH": str(REPO)}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("time budget spent after") == 1, result.stdout  # rank zero only
    assert "time budget spent after 3.00 epochs (12 steps)" in result.stdout  # 4 steps an epoch
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = torch.load(tmp_path / "version_0/checkpoints/last.ckpt", map_location="cpu",
                       weights_only=False)["global_step"]
    assert steps == 12
    assert [len(r["optimizer_lrs"]) for r in ranks] == [12, 12]  # the same last step
    assert ranks[1]["optimizer_lrs"] == ranks[0]["optimizer_lrs"]  # exactly the same LR at every step
    # The LR the optimizer stepped with is the budget's schedule on rank 0's clock (step i starts
    # at i x 0.25 s of 3 s; warmup 5%, then cosine to 1% of the peak), not the module's own
    # epoch-based warmup + cosine, which it overrides.
    peak = 1e-3 * 16 / 32  # configs/demo.yaml: lr 1e-3 per 32 images; global batch 16
    expected = []
    for i in range(12):
        p = i / 12
        factor = max(p / 0.05, 1e-3) if p < 0.05 else 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (p - 0.05) / 0.95))
        expected.append(peak * factor)
    assert [lrs[0] for lrs in ranks[0]["optimizer_lrs"]] == pytest.approx(expected, rel=1e-6)
