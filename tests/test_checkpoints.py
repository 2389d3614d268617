"""load_weights: every checkpoint format it claims, the adaptations it reports, the errors it raises."""

from __future__ import annotations

import argparse
import pickle

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from vit_service.artifact import ModelArtifact
from vit_service.formats.checkpoints import CheckpointError, LoadReport, load_weights
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import Preprocessing

# A small timm ViT (kwargs for vit_tiny_patch16_224) and our matching config: enough to exercise
# every key of the format, cheap to build.
SMALL = dict(img_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=10)
SMALL_CFG = ViTConfig(image_size=64, patch_size=16, num_classes=10, embed_dim=64, depth=2, num_heads=2)


def _images(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def sd(timm_vit) -> dict[str, torch.Tensor]:
    return dict(timm_vit("vit_tiny_patch16_224", **SMALL).state_dict())


def _load(source, cfg: ViTConfig = SMALL_CFG, **kwargs) -> tuple[VisionTransformer, LoadReport]:
    model = VisionTransformer(cfg).eval()
    return model, load_weights(model, source, **kwargs)


def _assert_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def _assert_weights_subset(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for k, v in got.items():
        assert torch.equal(v, expected[k]), k


# --- torchvision ---------------------------------------------------------------------------

def _torchvision_vit(perturb, **kwargs) -> torchvision.models.VisionTransformer:
    torch.manual_seed(0)
    return perturb(torchvision.models.VisionTransformer(
        image_size=224, patch_size=16, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=768,
        num_classes=10, **kwargs))


def test_torchvision_logits_match(tmp_path, perturb):
    tv = _torchvision_vit(perturb)  # perturbed: torchvision initialises its head to zeros
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    cfg = ViTConfig.from_preset("vit_tiny_patch16_224", depth=2, num_classes=10)
    ours, report = _load(tmp_path / "tv.pth", cfg)
    assert report.format == "torchvision" and report.loaded == len(tv.state_dict())
    x = _images(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-4, rtol=0)

    # Older torchvision releases named the MLP layers linear_1/linear_2.
    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
              for k, v in tv.state_dict().items()}
    assert legacy.keys() != tv.state_dict().keys()
    _assert_weights(_load(legacy, cfg)[0], ours.state_dict())


def test_torchvision_pre_logits_is_unsupported(perturb):
    tv = _torchvision_vit(perturb, representation_size=192)
    cfg = ViTConfig.from_preset("vit_tiny_patch16_224", depth=2, num_classes=10)
    with pytest.raises(CheckpointError, match=r"heads\.pre_logits\.weight.*not supported"):
        _load(tv.state_dict(), cfg)


# --- resolution and head adaptation ----------------------------------------------------------

def test_224_checkpoint_into_384_model_matches_timm(tmp_path, timm_vit):
    ref224 = timm_vit("vit_tiny_patch16_224", global_pool="token")  # shared with test_model
    sd224 = ref224.state_dict()
    save_file({k: v.contiguous() for k, v in sd224.items()}, str(tmp_path / "w224.safetensors"))
    ours, report = _load(tmp_path / "w224.safetensors", ViTConfig.from_preset("vit_tiny_patch16_224", image_size=384))
    assert report.pos_embed_resampled == ((14, 14), (24, 24))
    assert "14x14 -> 24x24" in str(report)

    ref384 = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=384).eval()
    pos = resample_abs_pos_embed(sd224["pos_embed"], new_size=(24, 24), num_prefix_tokens=1)
    ref384.load_state_dict({**sd224, "pos_embed": pos})
    x = _images(2, 3, 384, 384)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref384(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("ckpt_classes", [1000, 0])  # another class count; a headless backbone
def test_head_reinitialized_when_class_count_differs(timm_vit, ckpt_classes):
    sd = timm_vit("vit_tiny_patch16_224", **{**SMALL, "num_classes": ckpt_classes}).state_dict()
    model = VisionTransformer(SMALL_CFG)
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    report = load_weights(model, sd)
    assert report.head_reinitialized and "head not loaded" in str(report)
    assert not report.missing and not report.unexpected
    _assert_weights(model.head, fresh_head)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    _assert_weights_subset(backbone, sd)


def test_same_head_is_loaded(sd):
    model, report = _load(sd)
    _assert_weights(model, sd)  # head included, every tensor as in the checkpoint
    assert not report.head_reinitialized and report.pos_embed_resampled is None
    assert report.format == "state_dict" and report.loaded == len(sd)


# --- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"patch_size": 32}, r"patch size \(32, 32\) differs from the model's \(16, 16\)"),
    ({"in_chans": 1}, r"checkpoint has 1 input channels, the model 3"),
    ({"embed_dim": 96}, r"wrong shape.*pos_embed: checkpoint \(1, 17, 96\) vs model \(1, 17, 64\)"),
])
def test_architecture_mismatch_is_a_clear_error(timm_vit, kwargs, message):
    sd = timm_vit("vit_tiny_patch16_224", **{**SMALL, **kwargs}).state_dict()
    with pytest.raises(CheckpointError, match=message):
        _load(sd)


def test_unmatched_keys(sd):
    with pytest.raises(CheckpointError, match=r"unexpected 1 \[bogus\.weight\]"):
        _load({**sd, "bogus.weight": torch.zeros(3)})
    dropped = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match=r"missing 1 \[blocks\.1\.mlp\.fc2\.bias\]"):
        _load(dropped)

    # strict=False loads the rest and lists what it could not match.
    model, report = _load({**dropped, "bogus.weight": torch.zeros(3)}, strict=False)
    assert report.missing == ["blocks.1.mlp.fc2.bias"] and report.unexpected == ["bogus.weight"]
    assert report.loaded == len(sd) - 1
    assert "bogus.weight" in str(report) and "blocks.1.mlp.fc2.bias" in str(report)
    _assert_weights_subset({k: v for k, v in model.state_dict().items() if k in dropped}, sd)


def test_many_unmatched_keys_are_listed_with_a_count(sd):
    extra = {f"extra.{i:02d}": torch.zeros(1) for i in range(25)}
    with pytest.raises(CheckpointError, match=r"unexpected 25 \[extra\.00, .*extra\.19, \.\.\. \(5 more\)\]"):
        _load({**sd, **extra})


@pytest.mark.parametrize("name,content", [
    ("garbage.pth", b"this is not a checkpoint\n" * 10),
    ("empty.ckpt", b""),
    ("garbage.safetensors", b"\x00\x01\x02 not safetensors"),
])
def test_unreadable_file_names_the_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=name):
        _load(tmp_path / name)


def test_missing_file_and_plain_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth: no such checkpoint file"):
        _load(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="is a directory but not an exported model"):
        _load(tmp_path)


def test_file_without_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "args": {"lr": 0.1}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"no state dict found \(keys: 2 \[epoch, args\]\)"):
        _load(tmp_path / "x.pth")


# --- wrapped training checkpoints ----------------------------------------------------------

def _prefixed(d: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in d.items()}


# (checkpoint built from (weights, other weights), prefer_ema, which of the two must load)
WRAPPED = {
    "model": (lambda w, o: {"model": w, "epoch": 3}, False, "w"),
    "state_dict": (lambda w, o: {"state_dict": w, "arch": "vit_tiny"}, False, "w"),
    "model_ema preferred": (lambda w, o: {"model": o, "model_ema": w}, True, "w"),
    "model_ema ignored": (lambda w, o: {"model": w, "model_ema": o}, False, "w"),
    "state_dict_ema preferred": (lambda w, o: {"state_dict": o, "state_dict_ema": w}, True, "w"),
    "prefer_ema without ema": (lambda w, o: {"model": w}, True, "w"),
    "DDP module.": (lambda w, o: _prefixed(w, "module."), False, "w"),
    "compiled _orig_mod.": (lambda w, o: {"model": _prefixed(w, "_orig_mod.")}, False, "w"),
}


@pytest.mark.parametrize("case", list(WRAPPED))
def test_wrapped_state_dicts(tmp_path, sd, case):
    build, prefer_ema, _ = WRAPPED[case]
    other = {k: v + 1 for k, v in sd.items()}
    torch.save(build(sd, other), tmp_path / "ckpt.pth")
    model, report = _load(tmp_path / "ckpt.pth", prefer_ema=prefer_ema)
    assert report.format == "timm"
    _assert_weights(model, sd)


def _lightning_ckpt(weights: dict, ema: dict | None, *, averaging_callback: bool = False) -> dict:
    """The layout Lightning saves for our module; EMA as an `ema.module.*` submodule, or as
    Lightning's WeightAveraging callback stores it (average in state_dict, raw weights moved)."""
    ckpt = {
        "epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.5.0",
        # A pickled object, as LightningCLI's saved hyper-parameters can hold: weights_only fails.
        "hyper_parameters": {"preset": "vit_tiny_patch16_224", "args": argparse.Namespace(lr=0.1)},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
    }
    if averaging_callback:
        ckpt["state_dict"] = _prefixed(ema, "model.")
        ckpt["current_model_state"] = _prefixed(weights, "model.")
        ckpt["averaging_state"] = {"n_averaged": torch.tensor(10)}
    else:
        ckpt["state_dict"] = {**_prefixed(weights, "model."), **_prefixed(ema or {}, "ema.module."),
                              "train_loss.weight": torch.ones(10)}
    return ckpt


@pytest.mark.parametrize("averaging_callback", [False, True])
@pytest.mark.parametrize("prefer_ema", [False, True])
def test_lightning_checkpoint(tmp_path, sd, prefer_ema, averaging_callback):
    ema = {k: v + 1 for k, v in sd.items()}
    path = tmp_path / "last.ckpt"
    torch.save(_lightning_ckpt(sd, ema, averaging_callback=averaging_callback), path)
    with pytest.raises(pickle.UnpicklingError):  # so the weights_only=False retry is exercised
        torch.load(path, weights_only=True)
    model, report = _load(path, prefer_ema=prefer_ema)
    assert report.format == "lightning"
    _assert_weights(model, ema if prefer_ema else sd)


def test_lightning_checkpoint_of_a_compiled_model(sd):
    ckpt = {"state_dict": _prefixed(sd, "model._orig_mod."), "epoch": 1}
    model, report = _load(ckpt)
    assert report.format == "lightning"
    _assert_weights(model, sd)


# --- our artifact ---------------------------------------------------------------------------

def test_artifact_directory(tmp_path):
    src = VisionTransformer(SMALL_CFG)
    ModelArtifact(SMALL_CFG, [f"c{i}" for i in range(10)], Preprocessing(image_size=64)).save(src, tmp_path / "m")
    model, report = _load(tmp_path / "m")
    assert report.format == "artifact" and str(tmp_path / "m") in report.source
    _assert_weights(model, src.state_dict())
