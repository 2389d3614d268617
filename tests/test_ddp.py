"""Lightning DDP with 2 CPU processes (gloo) through the real `vit-train`: the LR scales with the
global batch, both ranks end validation with the same metrics, those of the full val set, and a
wall-clock budget gives every rank the same LR schedule and the same last step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, demo_config, run_cli
from training.data import ImageFolderDataModule
from training.module import ViTClassifier


def _full_set_metrics(ckpt_path: Path) -> dict[str, float]:
    """val/acc1, val/acc5 (macro: the mean of per-class recalls) and val/loss over the whole val
    folder, in this one process, from the checkpoint saved after that validation."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    hp = {k: v for k, v in ckpt["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    dm = ImageFolderDataModule(**{**hp, "num_workers": 0})
    dm.setup("validate")
    images, labels = zip(*(dm.datasets["val"][i] for i in range(len(dm.datasets["val"]))))
    x, y = torch.stack(images), torch.tensor(labels)
    module = ViTClassifier.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    with torch.no_grad():
        logits = module(x)
    top5 = logits.topk(5, dim=-1).indices
    hits1, hits5 = logits.argmax(-1) == y, (top5 == y[:, None]).any(-1)
    classes = y.unique()
    return {
        "val/acc1": float(torch.stack([hits1[y == c].float().mean() for c in classes]).mean()),
        "val/acc5": float(torch.stack([hits5[y == c].float().mean() for c in classes]).mean()),
        "val/loss": float(F.cross_entropy(logits, y)),
    }


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
    # Rank 1's clock runs half the budget ahead: on its own it would use other LRs than rank 0
    # and stop first, leaving rank 0 waiting in the gradient all-reduce.
    callbacks = [
        {"class_path": "tests.training_probe.SkewedTimeBudget", "init_args": {"minutes": 0.05, "skew_s": 1.5}},
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
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = torch.load(tmp_path / "version_0/checkpoints/last.ckpt", map_location="cpu",
                       weights_only=False)["global_step"]
    assert steps > 3  # the schedule had room to move: warmup, then the cosine
    assert [len(r["step_lrs"]) for r in ranks] == [steps, steps]  # the same last step
    assert ranks[1]["step_lrs"] == ranks[0]["step_lrs"]  # exactly the same LR at every step
