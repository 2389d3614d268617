"""Training through the real `vit-train` CLI, resume, export round trip, configs.
(The recipe's effects: test_recipe.py; DDP: test_ddp.py.)"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import REPO, demo_config, run_cli_in_process
from training.cli import run_cli as run_lightning_cli
from training.module import ViTClassifier, warmup_cosine
from vit_service.artifact import load_model


def _read_metrics(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / "metrics.csv"
    assert path.is_file(), f"no metrics.csv in {run_dir}"
    with path.open() as f:
        return list(csv.DictReader(f))


def test_fit_writes_checkpoints_logs_and_config(trained_run: Path) -> None:
    ckpts = trained_run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert list(ckpts.glob("best-epoch*-acc*.ckpt"))
    assert "vit_demo_patch8_64" in (trained_run / "config.yaml").read_text()
    assert list(trained_run.glob("events.out.tfevents.*"))
    rows = _read_metrics(trained_run)
    val = [r for r in rows if r.get("val/acc1")]
    assert len(val) == 2  # one validation per epoch
    # It learns: the training loss falls from the first epoch to the second, and from the first
    # step to the last (the full demo run's accuracy: test_demo_command.py, slow).
    epoch_loss = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    step_loss = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(epoch_loss) == 2 and epoch_loss[1] < epoch_loss[0] - 0.01
    assert step_loss[-1] < step_loss[0]
    assert any(v for r in rows for k, v in r.items() if k.startswith("lr-AdamW"))


def test_fit_prints_no_dependency_deprecation_noise(trained_run: Path) -> None:
    """Lightning's use of torch's deprecated LeafSpec warned on every run (issue 30); filtered."""
    printed = (trained_run.parent / "fit.log").read_text()
    assert "LeafSpec" not in printed and "FutureWarning" not in printed, printed[-3000:]


def test_acc1_is_top1_accuracy_and_the_class_mean_has_its_own_name() -> None:
    """acc1 = correct / total (micro), as timm and papers report it; torchmetrics' default
    (macro, the mean per-class recall) differs on an imbalanced set and is balanced_acc1."""
    from training.module import _accuracy_metrics

    metrics = _accuracy_metrics(3, "val/")
    # 8 of class 0 (all right), 1 of class 1 (wrong), 1 of class 2 (right): 9 / 10 right
    targets = torch.tensor([0] * 8 + [1, 2])
    predicted = torch.tensor([0] * 8 + [0, 2])
    metrics.update(torch.nn.functional.one_hot(predicted, 3).float(), targets)
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values["val/acc1"] == pytest.approx(0.9)
    assert values["val/balanced_acc1"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    # acc5 likewise: of 7 classes, every image ranks 0-4 first; 9 of 10 labels are among them (micro)
    metrics = _accuracy_metrics(7, "val/")
    metrics.update(torch.arange(7, 0, -1).float().expand(10, 7), torch.tensor([0] * 8 + [1, 6]))
    assert float(metrics.compute()["val/acc5"]) == pytest.approx(0.9)


def test_a_limited_validation_says_so_beside_the_figure(demo_data: Path, tmp_path: Path) -> None:
    """--trainer.limit_val_batches evaluates part of the val set: the progress line and the
    export say on how many images the val figures are (issue 30: "val top-1" of 1 class in 10)."""
    config = demo_config(tmp_path, demo_data, max_epochs=1, limit_train_batches=2)
    # in-process, where `1` once parsed as 1.0 (lightning_compat.keep_trainer_counts_integers)
    result = run_cli_in_process("vit-train", "fit", "--config", str(config), "--trainer.limit_val_batches", "1",
                                "--data.batch_size", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert "(val on 8 of 24 images)" in printed, printed[-3000:]
    export = run_cli_in_process("vit-export", "--run", str(tmp_path / "version_0"), "--name", "limited",
                     env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    assert export.returncode == 0, export.stderr[-3000:]
    assert "on 8 of 24 val images" in export.stderr, export.stderr[-2000:]


def test_checkpoint_carries_labels_and_preprocessing(trained_run: Path, demo_data: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert hp["class_names"] == sorted(p.name for p in (demo_data / "train").iterdir())
    assert hp["num_classes"] == len(hp["class_names"])
    assert hp["preprocessing"]["image_size"] == 64
    assert ckpt["vit_service"]["train_time_s"] > 0


def test_resume_from_last_continues_step_count(trained_run: Path, demo_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "resumed"
    run_dir = root / "version_0"
    shutil.copytree(trained_run / "checkpoints", run_dir / "checkpoints")
    before = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    config = demo_config(root, demo_data, max_epochs=3)
    result = run_cli_in_process("vit-train", "fit", "--config", str(config), "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    after = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert after["epoch"] == before["epoch"] + 1
    steps_per_epoch = before["global_step"] // (before["epoch"] + 1)
    assert after["global_step"] == before["global_step"] + steps_per_epoch
    assert after["vit_service"]["train_time_s"] > before["vit_service"]["train_time_s"]


def test_export_round_trip(trained_run: Path, tmp_path: Path) -> None:
    home = tmp_path / "bentoml"
    ckpt = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    result = run_cli_in_process("vit-export", "--ckpt", str(ckpt), "--name", "demo-vit", env={"BENTOML_HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    tag = result.stdout.strip().splitlines()[-1]
    name, version = tag.split(":")
    assert name == "demo-vit"
    model_dir = home / "models" / name / version
    exported, artifact = load_model(model_dir)

    module = ViTClassifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), module(x), rtol=0, atol=0)
    assert artifact.class_names == module.hparams.class_names
    assert artifact.preprocessing.image_size == 64 and artifact.preprocessing.crop_pct == 1.0
    assert artifact.metadata["val_acc1"] is not None
    assert artifact.metadata["dataset"]["train_dir"].endswith("train")


@pytest.mark.parametrize(
    "content, message", [(None, "no such checkpoint"), (b"not a checkpoint", "not a readable checkpoint")]
)
def test_export_bad_checkpoint_is_a_clear_error(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "model.ckpt"
    if content is not None:
        path.write_bytes(content)
    result = run_cli_in_process("vit-export", "--ckpt", str(path), env={"BENTOML_HOME": str(tmp_path / "b")})
    assert result.returncode == 2
    assert message in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_export_ema_requires_ema_weights(trained_run: Path, tmp_path: Path) -> None:
    result = run_cli_in_process("vit-export", "--ckpt", str(trained_run / "checkpoints/last.ckpt"), "--ema",
                                env={"BENTOML_HOME": str(tmp_path / "b")})
    assert result.returncode == 2 and "no EMA weights" in result.stderr


def test_ema_is_validated_checkpointed_and_exportable(demo_data: Path, tmp_path: Path) -> None:
    ema = [{"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}}]
    config = demo_config(tmp_path, demo_data, callbacks=ema, max_epochs=1, limit_train_batches=3)
    result = run_cli_in_process("vit-train", "fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt_path = next((tmp_path / "version_0/checkpoints").glob("best-*.ckpt"))
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert "current_model_state" in ckpt  # Lightning keeps the raw weights apart from the average

    home = {"BENTOML_HOME": str(tmp_path / "bentoml")}
    exported = {}
    for flag in ([], ["--ema"]):
        out = run_cli_in_process("vit-export", "--ckpt", str(ckpt_path), "--name", "ema-test", *flag, env=home)
        assert out.returncode == 0, out.stderr[-3000:]
        name, version = out.stdout.strip().splitlines()[-1].split(":")
        exported[bool(flag)], _ = load_model(tmp_path / "bentoml/models" / name / version)
    raw_w, ema_w = (exported[k].state_dict()["head.weight"] for k in (False, True))
    torch.testing.assert_close(raw_w, ckpt["current_model_state"]["model.head.weight"])
    torch.testing.assert_close(ema_w, ckpt["state_dict"]["model.head.weight"])
    assert not torch.equal(raw_w, ema_w)


def test_init_from_timm_weights_at_another_resolution(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    path = tmp_path / "vit_tiny_224.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    module = ViTClassifier(preset="vit_tiny_patch16_224", num_classes=3, image_size=64, init_from=str(path))
    ours = module.model.state_dict()
    torch.testing.assert_close(ours["blocks.3.attn.qkv.weight"], source.state_dict()["blocks.3.attn.qkv.weight"])
    assert ours["pos_embed"].shape == (1, 1 + 4 * 4, 192)  # 14x14 grid resampled to 4x4
    assert ours["head.weight"].shape == (3, 192)  # a new head for 3 classes
    assert module(torch.randn(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_parses(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--config", str(REPO / "configs" / config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "preset:" in printed and "train_dir:" in printed


def test_class_mismatch_between_train_and_val_is_a_clear_error(demo_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    victim = sorted((data / "val").iterdir())[0]
    shutil.rmtree(victim)
    result = run_cli_in_process("vit-train", "fit", "--config", str(demo_config(tmp_path, data)), "--trainer.fast_dev_run", "1")
    assert result.returncode != 0
    assert victim.name in result.stderr and "Traceback" not in result.stderr


def test_empty_dataset_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    result = run_cli_in_process("vit-train", "fit", "--config", str(demo_config(tmp_path, empty)), "--trainer.fast_dev_run", "1")
    assert result.returncode != 0
    assert str(empty / "train") in result.stderr and "Traceback" not in result.stderr


def test_warmup_cosine_schedule() -> None:
    values = [warmup_cosine(s, 10, 110, 0.01) for s in range(111)]
    assert values[0] < values[5] < values[9] <= 1.0
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[110] == pytest.approx(0.01)


def _tiny_module(num_classes: int) -> ViTClassifier:
    return ViTClassifier("vit_demo_patch8_64", num_classes=num_classes, image_size=32,
                         model_overrides={"depth": 1, "embed_dim": 32, "num_heads": 2})


@pytest.mark.parametrize("num_classes, k", [(7, 5), (3, 3)])
def test_predict_step_gives_the_top_k_of_the_softmax_for_any_batch(num_classes: int, k: int) -> None:
    """`trainer.predict` hands predict_step (images, ...) pairs from vit-train's loader, or the plain
    image tensors of a user's own loader: either way the top min(5, K) of each image's softmax,
    whatever the batch size (2 here)."""
    module = _tiny_module(num_classes).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        probs = module(x).softmax(-1)  # (2, K)
        for batch in (x, [x, torch.tensor([0, 1])]):
            out = module.predict_step(batch, 0)
            assert out["indices"].shape == out["scores"].shape == (2, k)
            expected = probs.sort(dim=-1, descending=True)
            torch.testing.assert_close(out["scores"], expected.values[:, :k])
            assert out["indices"].tolist() == expected.indices[:, :k].tolist()


def _fit_on_tensors(module: ViTClassifier, images: int, root: Path, callbacks: tuple = (), **trainer_args: Any):
    """A fit of one epoch on `images` random 32 px images in batches of 4 (6 to validate), through a
    DataModule of a user's own (a `batch_size` attribute, no `num_skipped_files`); returns the
    trainer and the LR of each step."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class Tensors(L.LightningDataModule):
        batch_size = 4

        def train_dataloader(self) -> DataLoader:
            data = TensorDataset(torch.randn(images, 3, 32, 32), torch.arange(images) % 3)
            return DataLoader(data, batch_size=self.batch_size)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.randn(6, 3, 32, 32), torch.arange(6) % 3), batch_size=4)

    class StepLRs(L.Callback):
        seen: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    lrs = StepLRs()
    lrs.seen = []
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=[*callbacks, lrs], **trainer_args)
    trainer.fit(module, datamodule=Tensors())
    return trainer, lrs.seen


def test_the_module_trains_with_a_datamodule_of_its_own(tmp_path: Path) -> None:
    """ViTClassifier is a plain LightningModule: a user's DataModule trains it; the count of
    unreadable files (the folder module's) is logged only where it exists; the checkpoint carries the
    resolved architecture and the run's figures."""
    from vit_service.formats.sources import CHECKPOINT_CONFIG_KEY

    from lightning.pytorch.callbacks import Timer

    class TwoMinutes(Timer):  # the run's clock (a Timer of the user's own is kept), stopped at 120 s
        def time_elapsed(self, stage: str = "train") -> float:
            return 120.04

    module = _tiny_module(3)
    trainer, _ = _fit_on_tensors(module, 8, tmp_path, callbacks=(TwoMinutes(),))
    assert trainer.global_step == 2 and "data/skipped_files" not in trainer.callback_metrics
    # the training loss per step and per epoch, the rest per epoch; the bar shows losses and accuracies,
    # the clock and the image count go to the logger only
    accuracies = {f"{split}/{name}" for split in ("train", "val") for name in ("acc1", "acc5", "balanced_acc1")}
    shown = {"train/loss_step", "train/loss_epoch", "val/loss", *accuracies}
    assert set(trainer.progress_bar_metrics) == shown
    assert set(trainer.logged_metrics) == shown | {"time/elapsed_min", "val/images"}
    assert float(trainer.logged_metrics["time/elapsed_min"]) == pytest.approx(120.04 / 60)  # minutes
    trainer.validate(module, datamodule=trainer.datamodule)  # the training clock is fit's alone
    assert "val/acc1" in trainer.logged_metrics and "time/elapsed_min" not in trainer.logged_metrics
    # the LR scales with its `batch_size`, as with --data.batch_size: 5e-4 x 4 / 512 (the defaults)
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(5e-4 * 4 / 512)
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", map_location="cpu", weights_only=False)
    assert ckpt[CHECKPOINT_CONFIG_KEY] == module.model.config.to_dict()
    figures = ckpt["vit_service"]
    assert (figures["epoch"], figures["global_step"], figures["val_images_total"]) == (1, 2, 6)
    assert figures["train_time_s"] == 120.0  # the run's clock, to a tenth of a second
    assert {"val_loss", "val_acc1", "val_acc5", "val_balanced_acc1", "val_images"} <= figures.keys()
    assert figures["val_images"] == 6.0 and 0 <= figures["val_acc1"] <= 1


def test_loaders_handed_to_fit_scale_the_lr_by_the_module_s_batch_size_or_say_they_cannot(tmp_path: Path) -> None:
    """`trainer.fit(module, loader)` has no data module to read the batch size from: the module's own
    `batch_size` (Lightning's batch-size finder looks there too), else a batch of 1 and a warning."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 3), batch_size=4)
    module = ViTClassifier("vit_demo_patch8_64", num_classes=3, image_size=32, lr=1e-3, lr_base_batch_size=4,
                           model_overrides={"depth": 1, "embed_dim": 32, "num_heads": 2})

    def peak_lr() -> float:
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, train_dataloaders=loader)
        assert trainer.global_step == 2
        return trainer.optimizers[0].param_groups[0]["initial_lr"]

    with pytest.warns(UserWarning) as warned:
        assert peak_lr() == pytest.approx(1e-3 * 1 / 4)
    assert ("no `batch_size` on the module or its data module: the LR is scaled for a per-device batch of 1 "
            "(lr x global batch / lr_base_batch_size); set the module's `batch_size` to the training loader's"
            ) in [str(w.message) for w in warned]
    module.batch_size = 4
    assert peak_lr() == pytest.approx(1e-3 * 4 / 4)


def test_init_from_takes_a_folder_s_architecture_and_a_checkpoint_s_ema_when_asked(tmp_path: Path) -> None:
    """--model.init_from a transformers folder builds its architecture (the preset goes unused) with
    its weights; from a vit-train checkpoint that kept EMA weights, the raw ones, or the EMA with
    --model.init_prefer_ema true."""
    from vit_service.artifact import ModelArtifact
    from vit_service.formats.transformers_vit import save_transformers_folder
    from vit_service.model import ViTConfig, VisionTransformer
    from vit_service.preprocessing import Preprocessing

    def weights_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())

    config = ViTConfig(image_size=32, patch_size=8, num_classes=3, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)
    source = VisionTransformer(config)
    save_transformers_folder(source, ModelArtifact(config, ["a", "b", "c"], Preprocessing(32, 1.0)), tmp_path / "hf")
    module = ViTClassifier("vit_demo_patch8_64", num_classes=3, init_from=str(tmp_path / "hf"))
    built = module.model.config
    assert (built.embed_dim, built.depth, built.num_heads, built.mlp_ratio) == (48, 2, 3, 2.0)
    assert weights_equal(module.model, source.state_dict())

    tiny = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    raw = ViTClassifier("vit_demo_patch8_64", num_classes=3, image_size=32, model_overrides=tiny).model.state_dict()
    ema = {k: v + 1 for k, v in raw.items()}
    torch.save({"epoch": 1, "global_step": 2, "pytorch-lightning_version": "2.6.0",
                "state_dict": {**{f"model.{k}": v for k, v in raw.items()},
                               **{f"ema.module.{k}": v for k, v in ema.items()}}}, tmp_path / "run.ckpt")
    for prefer_ema, expected in ((False, raw), (True, ema)):
        started = ViTClassifier("vit_demo_patch8_64", num_classes=3, image_size=32, model_overrides=tiny,
                                init_from=str(tmp_path / "run.ckpt"), init_prefer_ema=prefer_ema)
        assert weights_equal(started.model, expected), prefer_ema


def test_init_from_says_what_it_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tiny = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    weights = ViTClassifier("vit_demo_patch8_64", num_classes=3, image_size=32, model_overrides=tiny).model.state_dict()
    torch.save(weights, tmp_path / "weights.pth")
    with caplog.at_level("INFO", logger="training.module"):
        ViTClassifier("vit_demo_patch8_64", num_classes=3, image_size=32, model_overrides=tiny,
                      init_from=str(tmp_path / "weights.pth"))
    assert [m for m in caplog.messages if m.startswith("init_from: ")] == [
        f"init_from: loaded {len(weights)} tensors from {tmp_path / 'weights.pth'} (timm)"]


def test_accumulated_gradients_count_in_the_global_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two batches of 4 accumulated are one optimizer step on 8 images: the LR of a batch of 8, and
    the run's first lines say so."""
    module = ViTClassifier("vit_demo_patch8_64", num_classes=3, image_size=32, lr=1e-3, lr_base_batch_size=4,
                           model_overrides={"depth": 1, "embed_dim": 32, "num_heads": 2})
    with caplog.at_level("INFO", logger="training.module"):
        trainer, _ = _fit_on_tensors(module, 16, tmp_path, accumulate_grad_batches=2)
    assert trainer.global_step == 2
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(1e-3 * 8 / 4)
    assert "optimizer: AdamW, global batch 8, peak lr 0.002, 1 warmup / 2 total steps" in caplog.messages


def test_a_time_budget_drives_the_lr_on_its_clock(tmp_path: Path) -> None:
    """With a TimeBudget the schedule runs on the budget's share spent, not on steps: two steps into a
    100-hour budget (warmup: its first half) the LR has barely left the warmup's start (1e-3 of the
    peak), where the step schedule would be at 1/2 and 1/1 of the peak; it rises with the clock."""
    from training.callbacks import TimeBudget

    module = ViTClassifier("vit_demo_patch8_64", num_classes=3, image_size=32, lr=1e-3, lr_base_batch_size=4,
                           warmup_epochs=0.5, model_overrides={"depth": 1, "embed_dim": 32, "num_heads": 2})
    budget = TimeBudget(minutes=6000, warmup_fraction=0.5)
    trainer, lrs = _fit_on_tensors(module, 8, tmp_path, callbacks=(budget,))
    assert len(lrs) == 2 and all(1e-3 * 1e-3 <= lr < 1e-3 * 1e-2 for lr in lrs) and lrs[1] > lrs[0]
    # one training clock: the budget is the run's Timer, no second one beside it (one in every other run)
    from lightning.pytorch.callbacks import Timer

    assert [cb for cb in trainer.callbacks if isinstance(cb, Timer)] == [budget]


@pytest.mark.parametrize("images, factors", [(8, [0.5, 1.0]), (4, [1.0])])
def test_warmup_fits_the_run_however_short(images: int, factors: list[float], tmp_path: Path) -> None:
    """warmup_epochs 0.5 of a 2-step epoch is 1 step: the first step at 1/2 of the peak (warmup from
    1/(warmup steps + 1)), then the peak. A 1-step run has no room to warm up: its step is the peak."""
    module = ViTClassifier("vit_demo_patch8_64", num_classes=3, image_size=32, lr=1e-3, lr_base_batch_size=4,
                           warmup_epochs=0.5, model_overrides={"depth": 1, "embed_dim": 32, "num_heads": 2})
    _, lrs = _fit_on_tensors(module, images, tmp_path)
    assert lrs == pytest.approx([1e-3 * f for f in factors], rel=1e-9)
