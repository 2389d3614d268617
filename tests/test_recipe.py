"""The training recipe the README promises, checked by its effects in two short real runs.

Each run goes through the real LightningCLI (in this process, so the objects it built can be
inspected) with `tests.training_probe.TrainingProbe` recording what the training steps saw:
the batch the loss received, the LR of every step, the gradient norm the optimizer got, how
often a block ran. Expected values are written out by hand, never recomputed with the code
under test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing

from tests.conftest import REPO, demo_config
from tests.training_probe import TrainingProbe
from training.cli import ViTCLI, run_cli
from training.module import ViTClassifier
from vit_service.model import DropPath

PROBE = [{"class_path": "tests.training_probe.TrainingProbe"}]
BATCH = 8
DEMO_LR, DEMO_BASE_BATCH = 1e-3, 32  # configs/demo.yaml: model.lr, model.lr_base_batch_size
PEAK_LR = DEMO_LR * BATCH / DEMO_BASE_BATCH  # LR scaled by the global batch (one process here)


@dataclass
class Run:
    cli: ViTCLI
    probe: TrainingProbe

    @property
    def module(self) -> ViTClassifier:
        return self.cli.model


def _fit(run_dir: Path, demo_data: Path, *args: str, **trainer: object) -> Run:
    config = demo_config(run_dir, demo_data, callbacks=PROBE, num_sanity_val_steps=0, limit_val_batches=1,
                         **trainer)
    cli = run_cli(["fit", "--config", str(config), "--data.batch_size", str(BATCH), *args])
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, TrainingProbe))
    return Run(cli, probe)


@pytest.fixture(scope="module")
def plain_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """configs/demo.yaml as it is (label smoothing, stochastic depth, gradient clipping), 6 steps."""
    return _fit(tmp_path_factory.mktemp("plain"), demo_data, "--model.warmup_epochs", "1",
                max_epochs=2, limit_train_batches=3)


@pytest.fixture(scope="module")
def recipe_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The fine-tuning extras: Mixup/CutMix, RandAugment, random erasing, layer decay, grad checkpointing,
    another weight decay and AdamW's betas."""
    return _fit(
        tmp_path_factory.mktemp("recipe"), demo_data,
        "--model.mixup_alpha", "0.8", "--model.cutmix_alpha", "1.0", "--model.layer_decay", "0.65",
        # neither timm's defaults nor the demo's (layer decay 0.75, weight decay 0.05, AdamW's betas): each is seen passed
        "--model.weight_decay", "0.03", "--model.betas", "[0.8, 0.99]",
        "--model.grad_checkpointing", "true", "--data.auto_augment", "rand-m9-mstd0.5-inc1",
        "--data.re_prob", "0.25",
        max_epochs=1, limit_train_batches=2,
    )


# --- optimizer: weight-decay groups, per-step schedule, LR scaling --------------------------

def test_weight_decay_excludes_norms_biases_pos_embed_and_cls_token(plain_run: Run) -> None:
    groups = plain_run.probe.param_groups
    assert groups.keys() == dict(plain_run.module.model.named_parameters()).keys()
    no_decay = {n for n in groups if n.endswith(".bias") or re.search(r"(^|\.)(fc_)?norm\d?\.weight$", n)
                or n in ("pos_embed", "cls_token")}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "fc_norm.weight",
            "head.bias"} <= no_decay
    for name, group in groups.items():
        assert group["weight_decay"] == (0.0 if name in no_decay else 0.05), name


def test_lr_is_warmup_then_cosine_stepped_per_optimizer_step(plain_run: Run) -> None:
    # 2 epochs x 3 steps, warmup 1 epoch = 3 steps, then cosine to lr x 0.01 (min_lr_ratio).
    # Warmup: (k+1)/4 for k = 0, 1, 2; cosine: 0.01 + 0.99 x (1 + cos(pi x p)) / 2 for p = 0, 1/3, 2/3.
    expected = [0.25, 0.5, 0.75, 1.0, 0.7525, 0.2575]
    lrs = plain_run.probe.step_lrs
    assert len(lrs) == len(expected)
    for step, (group_lrs, factor) in enumerate(zip(lrs, expected)):
        for lr in group_lrs:
            assert lr == pytest.approx(PEAK_LR * factor, rel=1e-6), f"step {step}"


def test_lr_scales_with_the_global_batch(plain_run: Run) -> None:
    # configs/demo.yaml says lr 1e-3 for a batch of 32; this run's batch is 8.
    peak = max(max(step) for step in plain_run.probe.step_lrs)
    assert peak == pytest.approx(2.5e-4, rel=1e-6)


def test_layer_decay_gives_each_block_its_own_lr(recipe_run: Run) -> None:
    lr = {name: g["lr"] for name, g in recipe_run.probe.param_groups.items()}
    depth = len(recipe_run.module.model.blocks)
    for i in range(1, depth):
        assert lr[f"blocks.{i - 1}.attn.qkv.weight"] == pytest.approx(0.65 * lr[f"blocks.{i}.attn.qkv.weight"])
    assert lr["patch_embed.proj.weight"] == pytest.approx(0.65 * lr["blocks.0.attn.qkv.weight"])
    assert lr["pos_embed"] == lr["cls_token"] == lr["patch_embed.proj.weight"]
    # The head learns fastest, at the undecayed LR of the first warmup step (2 steps in all, so
    # 1 warmup step: 1/2).
    assert lr["head.weight"] == max(lr.values())
    assert lr["head.weight"] == pytest.approx(PEAK_LR / 2, rel=1e-6)
    assert lr[f"blocks.{depth - 1}.mlp.fc1.weight"] == pytest.approx(0.65 * lr["head.weight"])
    # Layer decay keeps the weight-decay exclusions (pos_embed and cls_token too) and --model.weight_decay.
    groups = recipe_run.probe.param_groups
    assert [groups[n]["weight_decay"] for n in ("blocks.1.norm2.weight", "pos_embed", "cls_token", "head.bias")] == [0.0] * 4
    assert groups["blocks.1.mlp.fc2.weight"]["weight_decay"] == groups["head.weight"]["weight_decay"] == 0.03
    assert {tuple(g["betas"]) for g in recipe_run.cli.trainer.optimizers[0].param_groups} == {(0.8, 0.99)}


def test_a_model_config_naming_nothing_gets_deit_s_recipe() -> None:
    """`model:` left out of a config (or `--model.*` unset): what `vit-train fit` builds is DeiT's
    recipe on ViT-Tiny for ImageNet-1k (Touvron et al., 2021), as the module's docstring says."""
    module = ViTClassifier()
    config = module.model.config
    assert (config.image_size, config.patch_size, config.embed_dim, config.depth, config.num_heads,
            config.num_classes) == (224, 16, 192, 12, 3, 1000)
    recipe = {k: v for k, v in module.hparams.items() if k not in ("preset", "num_classes")}
    assert recipe == {"image_size": None, "model_overrides": None, "init_from": None, "init_prefer_ema": False,
                      "lr": 5e-4, "lr_base_batch_size": 512, "weight_decay": 0.05, "betas": (0.9, 0.999),
                      "warmup_epochs": 5.0, "min_lr_ratio": 0.01, "layer_decay": None, "label_smoothing": 0.1,
                      "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
                      "compile": False, "grad_checkpointing": False, "class_names": None, "preprocessing": None}
    assert module.mixup is None and module.model.grad_checkpointing is False
    assert isinstance(module.train_loss, torch.nn.CrossEntropyLoss) and module.train_loss.label_smoothing == 0.1
    assert module.example_input_array.shape == (1, 3, 224, 224)  # the model summary's FLOPs input


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha", [(0.8, 0.0), (0.0, 1.0), (0.3, 0.7)])
def test_mixup_or_cutmix_alone_mixes_batches_with_every_setting_given(mixup_alpha: float, cutmix_alpha: float) -> None:
    from timm.loss import SoftTargetCrossEntropy

    module = ViTClassifier("vit_demo_patch8_64", num_classes=3, image_size=32, mixup_alpha=mixup_alpha,
                           cutmix_alpha=cutmix_alpha, mixup_prob=0.6, mixup_switch_prob=0.2, label_smoothing=0.05,
                           model_overrides={"depth": 1, "embed_dim": 32, "num_heads": 2})
    mixup = module.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.label_smoothing,
            mixup.num_classes) == (mixup_alpha, cutmix_alpha, 0.6, 0.2, 0.05, 3)
    assert isinstance(module.train_loss, SoftTargetCrossEntropy)  # Mixup's targets carry the smoothing


# --- loss: label smoothing, Mixup/CutMix soft targets --------------------------------------

def test_label_smoothing_is_in_the_training_loss(plain_run: Run) -> None:
    logits, targets, loss = plain_run.probe.loss_calls[0]
    assert targets.dtype == torch.long  # no Mixup: hard labels, smoothing inside the loss
    logp = logits.log_softmax(-1)
    eps = 0.1  # configs/demo.yaml: label_smoothing
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    smoothed = ((1 - eps) * nll + eps * -logp.mean(-1)).mean()
    torch.testing.assert_close(loss, smoothed, rtol=1e-5, atol=1e-6)
    assert abs(float(loss) - float(nll.mean())) > 1e-3  # smoothing changes the loss measurably


def test_mixup_cutmix_batches_have_soft_targets(recipe_run: Run) -> None:
    logits, targets, loss = recipe_run.probe.loss_calls[0]
    assert targets.shape == (BATCH, 6) and targets.is_floating_point()
    torch.testing.assert_close(targets.sum(-1), torch.ones(BATCH))
    assert (targets > 0).all()  # label smoothing folded into the soft targets
    off = 0.1 / 6  # label smoothing's share for every class
    mixed_rows = ((targets > off + 1e-3).sum(-1) >= 2).sum()
    assert mixed_rows >= BATCH // 2, targets  # pairs of different classes share each row's mass
    # The model saw mixed images, not the loader's, and the loss is soft-target cross-entropy.
    assert not torch.equal(recipe_run.probe.model_inputs[0], recipe_run.probe.loader_batches[0])
    torch.testing.assert_close(loss, -(targets * logits.log_softmax(-1)).sum(-1).mean())


# --- data: RandAugment and random erasing ---------------------------------------------------

def test_train_transform_has_randaugment_and_random_erasing(recipe_run: Run) -> None:
    datasets = recipe_run.cli.datamodule.datasets
    train_steps = datasets["train"].transform.transforms
    rand_augment = [t for t in train_steps if isinstance(t, RandAugment)]
    erasing = [t for t in train_steps if isinstance(t, RandomErasing)]
    assert len(rand_augment) == 1 and rand_augment[0].num_layers == 2
    assert {op.magnitude for op in rand_augment[0].ops} == {9}
    assert len(erasing) == 1 and erasing[0].probability == 0.25
    # Validation uses the shared, deterministic eval preprocessing (the one exported for serving).
    assert datasets["val"].transform is recipe_run.cli.datamodule.preprocessing


def test_plain_config_trains_without_randaugment_or_erasing(plain_run: Run) -> None:
    steps = plain_run.cli.datamodule.datasets["train"].transform.transforms
    assert not [t for t in steps if isinstance(t, (RandAugment, RandomErasing))]  # demo.yaml turns both off


# --- model: gradient checkpointing, stochastic depth ----------------------------------------

def test_gradient_checkpointing_recomputes_blocks_in_backward(recipe_run: Run, plain_run: Run) -> None:
    # A checkpointed block runs twice per step (forward, then again in backward); a plain one once.
    assert recipe_run.probe.block0_calls_per_step == [2, 2]
    assert plain_run.probe.block0_calls_per_step == [1] * 6


def test_stochastic_depth_drops_whole_residual_branches(plain_run: Run) -> None:
    blocks = plain_run.module.model.blocks
    # configs/demo.yaml: drop_path_rate 0.05, rising linearly over the blocks from 0.
    assert not isinstance(blocks[0].drop_path1, DropPath)
    rates = [b.drop_path1.p for b in blocks[1:]]
    assert rates == pytest.approx([0.05 * i / (len(blocks) - 1) for i in range(1, len(blocks))])
    drop = blocks[-1].drop_path2
    x = torch.ones(4000, 3, 2)  # (B, N, D)
    torch.manual_seed(0)
    drop.train()
    y = drop(x)
    dropped = (y == 0).all(dim=(1, 2)).float().mean()
    assert 0.03 < float(dropped) < 0.07
    kept = y[(y != 0).all(dim=(1, 2))]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.95))
    drop.eval()
    assert torch.equal(drop(x), x)


# --- gradient clipping ----------------------------------------------------------------------

def test_gradient_clipping_bounds_the_update(plain_run: Run) -> None:
    clip = yaml.safe_load((REPO / "configs/demo.yaml").read_text())["trainer"]["gradient_clip_val"]
    assert clip == plain_run.cli.trainer.gradient_clip_val == 1.0
    before, after = plain_run.probe.grad_norms_before_clip, plain_run.probe.grad_norms_at_step
    assert len(before) == len(after) == 6
    assert max(before) > clip  # otherwise this run would not show clipping at all
    for b, a in zip(before, after):
        assert a == pytest.approx(min(b, clip), rel=1e-3)


# --- checkpoints: .bin weights ---------------------------------------------------------------

def test_init_from_a_bin_state_dict(tmp_path: Path, perturb) -> None:
    source = ViTClassifier(preset="vit_demo_patch8_64", num_classes=6).model
    perturb(source, seed=3)
    path = tmp_path / "pytorch_model.bin"  # the Hugging Face / timm name for a pickled state dict
    torch.save(source.state_dict(), path)
    module = ViTClassifier(preset="vit_demo_patch8_64", num_classes=6, init_from=str(path))
    got = module.model.state_dict()
    assert got.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(got[key], value), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(module.model.eval()(x), source.eval()(x), rtol=0, atol=0)
