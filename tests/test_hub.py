"""timm hub names resolve through a Hugging Face cache laid out by hand, offline, with no download."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch

from conftest import run_cli
from hub_cache import cache_timm_model, hub_env
from vit_service.formats.timm_hub import HubError, load_timm, parse_timm_name

TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    cache.mkdir()
    return cache, cache_timm_model(cache, TINY)


@pytest.fixture
def offline_cache(hub_cache, monkeypatch: pytest.MonkeyPatch):
    """This process reads `hub_cache` only (huggingface_hub reads its constants at call time)."""
    cache, timm_model = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache, timm_model


@pytest.mark.parametrize("spelling", [TINY, f"timm/{TINY}", f"hf-hub:timm/{TINY}"])
def test_every_timm_spelling_names_the_same_repo(spelling: str) -> None:
    source = parse_timm_name(spelling)
    assert source is not None and source.repo_id == f"timm/{TINY}" and source.model_name == TINY


@pytest.mark.parametrize("spelling", [TINY, f"timm/{TINY}", f"hf-hub:timm/{TINY}"])
def test_the_model_source_loader_takes_every_spelling(offline_cache, spelling: str) -> None:
    from vit_service.formats.sources import load_model_source  # vit-explain's and vit-export's loader

    model, artifact = load_model_source(spelling)
    assert model.config.embed_dim == 192 and len(artifact.class_names) == 1000


def test_cached_timm_name_loads_with_timm_config_preprocessing_and_outputs(offline_cache) -> None:
    _, timm_model = offline_cache
    model, artifact = load_timm(f"hf-hub:timm/{TINY}")
    c = model.config
    assert (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.image_size, c.num_classes) == (192, 12, 3, 16, 224, 1000)
    p = artifact.preprocessing
    assert (p.image_size, p.crop_pct, p.interpolation, p.mean, p.std) == (224, 0.9, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert artifact.class_names[:2] == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - timm_model(x)).abs().max().item() <= 1e-4


def test_not_cached_offline_is_one_line_naming_the_repo_and_the_fetch_command(offline_cache) -> None:
    with pytest.raises(HubError) as e:
        load_timm("vit_small_patch16_224.augreg_in21k_ft_in1k")
    message = str(e.value)
    assert "\n" not in message
    assert "timm/vit_small_patch16_224.augreg_in21k_ft_in1k" in message and "hf download" in message


@pytest.mark.parametrize("name, reason", [
    ("vit_small_patch14_reg4_dinov2.lvd142m", "register tokens"),
    ("deit_tiny_distilled_patch16_224.fb_in1k", "distilled DeiT"),
    ("deit3_small_patch16_224.fb_in1k", "no_embed_class"),
    ("vit_medium_patch16_gap_256.sw_in12k_ft_in1k", "average pooling after the final norm"),
    ("vit_base_patch16_clip_224.openai", "pre-norm"),
    ("vit_little_patch16_reg1_gap_256.sbb_in12k_ft_in1k", "register tokens"),
])
def test_unsupported_variants_are_refused_by_reason_before_any_weights(offline_cache, name: str, reason: str) -> None:
    with pytest.raises(HubError, match=reason):
        load_timm(name)


def test_supported_variants_compute_what_timm_computes(offline_cache) -> None:
    """Layer scale and mean pooling without a class token have no hub file here: the definition check
    alone (timm's random weights through our model) must pass for them."""
    from vit_service.formats.timm_hub import check_same_function, config_from_timm
    from vit_service.model import VisionTransformer

    for name, kwargs in [("vit_small_patch16_224", dict(init_values=1e-5, depth=2)),
                         ("vit_small_patch16_224", dict(class_token=False, global_pool="avg", depth=2)),
                         ("deit_tiny_patch16_224", dict(depth=2, img_size=96))]:
        tm = timm.create_model(name, pretrained=False, **kwargs)
        check_same_function(tm, VisionTransformer(config_from_timm(tm, name)), name)


def test_vit_export_of_a_name_not_cached_offline_exits_2_with_one_line(hub_cache, tmp_path: Path) -> None:
    """(The successful `vit-export --from NAME` runs in tests/test_pretrained_serving.py.)"""
    cache, _ = hub_cache
    env = {**hub_env(cache), "BENTOML_HOME": str(tmp_path / "bentoml")}
    missing = run_cli("vit-export", "--from", "vit_base_patch16_224.augreg2_in21k_ft_in1k", env=env)
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0
    assert "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k" in missing.stderr and "hf download" in missing.stderr


def test_init_from_a_hub_name_sets_the_architecture_and_loads_the_cached_weights(offline_cache) -> None:
    from training.module import ViTClassifier

    _, timm_model = offline_cache
    module = ViTClassifier(preset="vit_base_patch16_224", num_classes=3, image_size=64, init_from=TINY)
    assert (module.model.config.embed_dim, module.model.config.num_classes, module.model.config.image_size) == (192, 3, 64)
    assert torch.equal(module.model.blocks[5].attn.qkv.weight, timm_model.blocks[5].attn.qkv.weight)


def test_a_bare_weight_file_loads_with_the_architecture_named_by_arch(offline_cache, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from vit_service.formats.sources import ModelSourceError, load_model_source

    _, timm_model = offline_cache
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model.state_dict().items()}, str(path))
    with pytest.raises(ModelSourceError, match="--arch"):
        load_model_source(path)
    model, artifact = load_model_source(path, arch="vit_tiny_patch16_224")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - timm_model(x)).abs().max().item() <= 1e-4
    assert len(artifact.class_names) == 1000


def test_another_owners_hf_hub_repo_holding_a_timm_vit_loads_its_own_weights(offline_cache) -> None:
    # someone/vit-tiny-finetuned: timm's config.json and a model.safetensors whose head differs
    # from timm's, so the logits show which weights were read.
    import copy
    import json

    from safetensors.torch import load_file, save

    from hub_cache import add_to_cache

    cache, timm_model = offline_cache
    (snapshot,) = (cache / f"models--timm--{TINY}" / "snapshots").iterdir()
    state = load_file(str(snapshot / "model.safetensors"))
    state["head.bias"] = state["head.bias"] + torch.linspace(-3, 3, 1000)
    add_to_cache(cache, "someone/vit-tiny-finetuned", {"model.safetensors": save(state),
                                                      "config.json": (snapshot / "config.json").read_bytes()})
    theirs = copy.deepcopy(timm_model)
    theirs.load_state_dict(state)
    assert json.loads((snapshot / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"

    model, artifact = load_timm("hf-hub:someone/vit-tiny-finetuned")
    assert model.config.embed_dim == 192 and artifact.config.num_classes == 1000
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - theirs(x)).abs().max().item() <= 1e-4
        assert (model(x) - timm_model(x)).abs().max().item() > 1.0  # not timm's own weights
