"""VisionTransformer against timm as the oracle, plus its own contracts (errors, hooks, compile)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vit_service.formats.checkpoints import load_weights
from vit_service.model import ViTConfig, VisionTransformer, resample_pos_embed

# Small enough that forward, backward and torch.compile stay fast on a 2-core CPU.
TINY = ViTConfig(image_size=32, patch_size=8, num_classes=5, embed_dim=64, depth=2, num_heads=2)


def _images(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_names_and_logits_match_timm(tmp_path, timm_vit, name, global_pool):
    ref = timm_vit(name, global_pool=global_pool)
    ours = VisionTransformer(ViTConfig.from_preset(name, global_pool=global_pool)).eval()
    sd = ref.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in sd.items()}

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    x = _images(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
    for file in ("w.safetensors", "w.pth"):
        with torch.no_grad():
            for p in ours.parameters():
                p.fill_(float("nan"))  # a tensor the load skips stays NaN
        report = load_weights(ours, tmp_path / file)
        assert report.loaded == len(sd) and not report.missing and not report.unexpected
        assert all(torch.equal(v, sd[k]) for k, v in ours.state_dict().items()), file
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0)


def test_other_input_size_matches_timm_dynamic_img_size(timm_vit):
    # timm resamples pos_embed on the fly with dynamic_img_size=True; ours always does.
    ref = timm_vit("vit_tiny_patch16_224", dynamic_img_size=True)
    ours = VisionTransformer(ViTConfig.from_preset("vit_tiny_patch16_224")).eval()
    load_weights(ours, ref.state_dict())
    for hw in [(160, 160), (160, 224)]:
        x = _images(2, 3, *hw)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_attention_maps(perturb):
    model = perturb(VisionTransformer(TINY))
    x = _images(2, 3, 32, 32)
    logits, maps = model.attention_maps(x)
    N = (32 // 8) ** 2 + 1
    assert len(maps) == TINY.depth
    for attn in maps:
        assert attn.shape == (2, TINY.num_heads, N, N)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, TINY.num_heads, N))
    with torch.no_grad():
        # Explicit softmax path vs the fused kernel: equal up to float rounding.
        torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,message", [
    ((2, 3, 36, 32), r"36x32 is not a multiple of the patch size 8"),
    ((2, 1, 32, 32), r"expected 3 channels, got 1"),
    ((3, 32, 32), r"expected images of shape \(B, C, H, W\)"),
])
def test_bad_input_raises(shape, message):
    with pytest.raises(ValueError, match=message):
        VisionTransformer(TINY)(torch.zeros(shape))


def test_no_weight_decay_names_real_parameters():
    model = VisionTransformer(TINY)
    names = model.no_weight_decay()
    assert names == {"pos_embed", "cls_token"}
    assert names <= dict(model.named_parameters()).keys()


def test_reset_classifier(perturb):
    model = perturb(VisionTransformer(TINY))
    x = _images(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(7)
        assert model.config.num_classes == 7 and model(x).shape == (2, 7)
        model.reset_classifier(0)  # feature extractor: forward returns the pooled features
        assert isinstance(model.head, nn.Identity)
        torch.testing.assert_close(model(x), features)


def test_grad_checkpointing_gives_same_gradients(perturb):
    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(0)  # the same weights both times
        model = perturb(VisionTransformer(TINY)).train()
        model.set_grad_checkpointing(checkpointing)
        calls = []
        for blk in model.blocks:
            # A pre-hook: recomputation stops early, once the saved tensors are rebuilt, so the
            # forward hook never fires the second time.
            blk.register_forward_pre_hook(lambda *_: calls.append(1))
        model(_images(2, 3, 32, 32)).logsumexp(-1).sum().backward()
        return {k: p.grad for k, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (TINY.depth, 2 * TINY.depth)  # blocks recomputed in backward
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("backend", [
    # aot_eager runs Dynamo's full tracing (fullgraph=True fails on any graph break) and AOT
    # autograd in about a second; Inductor's C++ code generation takes about a minute on 2 CPUs.
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.slow),
])
def test_torch_compile_fullgraph(perturb, backend):
    torch._dynamo.reset()
    model = perturb(VisionTransformer(TINY))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = _images(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_fp32(perturb):
    model = perturb(VisionTransformer(TINY))
    x = _images(2, 3, 32, 32)
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x)
    assert bf16.dtype == torch.bfloat16  # autocast really ran the linear layers in bf16
    # bf16 keeps 8 mantissa bits (~0.4% relative): loose, scaled to the logits' size.
    torch.testing.assert_close(bf16.float(), fp32, atol=0.05 * fp32.abs().max().item(), rtol=0.05)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown ViT preset 'vit_huge'"):
        ViTConfig.from_preset("vit_huge")
    with pytest.raises(ValueError, match="image_size 200 is not a multiple of patch_size 16"):
        ViTConfig.from_preset("vit_tiny_patch16_224", image_size=200)
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 4"):
        ViTConfig(image_size=30, patch_size=4)


def test_config_refuses_token_pooling_without_a_class_token() -> None:
    with pytest.raises(ValueError, match=r"^global_pool='token' needs class_token=True$"):
        ViTConfig(global_pool="token", class_token=False)
    assert ViTConfig(global_pool="avg", class_token=False).class_token is False  # avg pooling needs none


def test_resample_pos_embed_keeps_the_dtype_and_refuses_a_non_square_grid() -> None:
    pos = torch.randn(1, 1 + 16, 8).to(torch.bfloat16)  # a class token + a 4x4 grid
    out = resample_pos_embed(pos, (6, 6), num_prefix_tokens=1)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1 + 36, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1], rtol=0, atol=0)  # the class token is not resampled
    with pytest.raises(ValueError, match=r"^position embeddings of 15 patches are not a square grid$"):
        resample_pos_embed(torch.randn(1, 1 + 15, 8), (4, 4), num_prefix_tokens=1)


def test_reset_classifier_keeps_the_device_and_one_class_is_a_linear_head() -> None:
    with torch.device("meta"):
        model = VisionTransformer(ViTConfig(image_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                            num_classes=3))
    model.reset_classifier(5)
    assert model.head.weight.device.type == "meta" and model.head.out_features == 5
    model.reset_classifier(1)  # one logit (a binary score) is a head, not no head
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 1
    model.reset_classifier(0)
    assert isinstance(model.head, torch.nn.Identity)


def test_set_grad_checkpointing_turns_it_on_by_default() -> None:
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3))
    model.set_grad_checkpointing()
    assert model.grad_checkpointing is True
    model.set_grad_checkpointing(False)
    assert model.grad_checkpointing is False


def test_attention_paths_agree_and_dropout_only_while_training() -> None:
    from vit_service.model import Attention

    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=2, qkv_bias=True, attn_drop=0.5, proj_drop=0.0)
    x = torch.randn(2, 5, 16)
    attn.eval()
    fused, none = attn(x)
    explicit, weights = attn(x, return_attn=True)
    assert none is None and weights.shape == (2, 2, 5, 5)  # (B, h, N, N), rows sum to 1
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 5))
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)  # no dropout in eval, on either path
    torch.testing.assert_close(attn(x)[0], fused, rtol=0, atol=0)  # deterministic
    attn.train()
    assert not torch.allclose(attn(x)[0], fused, atol=1e-3)  # attention dropout in training (fused path)
    assert not torch.allclose(attn(x, return_attn=True)[0], fused, atol=1e-3)  # and on the explicit path
    attn.attn_drop = 0.0
    torch.testing.assert_close(attn(x, return_attn=True)[0], fused, rtol=1e-5, atol=1e-5)  # p=0: no change


def test_layer_scale_and_no_qkv_bias_match_timm(timm_vit) -> None:
    """DeiT-III style blocks (LayerScale) and attention without a qkv bias, against timm."""
    ref = timm_vit("vit_tiny_patch16_224", init_values=1e-5, qkv_bias=False, img_size=64)
    ours = VisionTransformer(ViTConfig.from_preset("vit_tiny_patch16_224", init_values=1e-5, qkv_bias=False,
                                                   image_size=64)).eval()
    sd = ref.state_dict()
    assert "blocks.0.ls1.gamma" in sd and "blocks.0.attn.qkv.bias" not in sd
    ours.load_state_dict(sd, strict=True)
    x = _images(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_drop_path_only_while_training() -> None:
    config = ViTConfig(image_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    plain = VisionTransformer(config)
    dropped = VisionTransformer(ViTConfig(**{**config.__dict__, "drop_path_rate": 0.5}))
    dropped.load_state_dict(plain.state_dict())
    x = _images(4, 3, 32, 32)
    plain.eval()
    dropped.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(x), plain(x), rtol=0, atol=0)  # eval: no stochastic depth
        dropped.train()
        plain.train()
        torch.manual_seed(0)
        assert not torch.allclose(dropped(x), plain(x), atol=1e-4)  # training: residual branches dropped


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match=r"^global_pool must be 'token' or 'avg', got 'max'$"):
        ViTConfig(global_pool="max")
    with pytest.raises(ValueError, match=r"^embed_dim 30 is not divisible by num_heads 4$"):
        ViTConfig(embed_dim=30, num_heads=4)


def test_stochastic_depth_grows_linearly_over_the_blocks() -> None:
    from vit_service.model import DropPath

    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                        drop_path_rate=0.5))
    def rate(m: nn.Module) -> float:
        return m.p if isinstance(m, DropPath) else 0.0

    assert [[rate(b.drop_path1), rate(b.drop_path2)] for b in model.blocks] == [[0.0, 0.0], [0.25, 0.25], [0.5, 0.5]]
    assert isinstance(model.blocks[0].drop_path1, nn.Identity) and isinstance(model.blocks[0].drop_path2, nn.Identity)


def test_without_a_class_token_or_head() -> None:
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                        class_token=False, global_pool="avg", num_classes=0))
    assert model.cls_token is None and model.num_prefix_tokens == 0 and model.grad_checkpointing is False
    assert isinstance(model.head, nn.Identity) and "cls_token" not in model.state_dict()
    assert model(_images(2, 3, 32, 32)).shape == (2, 32)  # pooled features: (B, D)
    assert model.forward_features(_images(2, 3, 32, 32)).shape == (2, 16, 32)  # 16 patches, no prefix token
    one = VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=1))
    assert isinstance(one.head, nn.Linear) and one.head.out_features == 1


def test_init_weights_follows_timm() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(image_size=64, patch_size=8, embed_dim=192, depth=1, num_heads=3))
    assert 0.015 < model.pos_embed.std().item() < 0.025  # trunc_normal_(std=0.02)
    assert 0 < model.cls_token.std().item() < 1e-5  # normal(std=1e-6): tiny, not zero


def test_drop_path_keeps_or_drops_whole_samples_and_rescales() -> None:
    from vit_service.model import DropPath

    torch.manual_seed(0)
    drop = DropPath(0.5).train()
    out = drop(torch.ones(256, 3, 4))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # each sample dropped, or kept and scaled by 1 / keep
    assert (per_sample == per_sample[:, :1]).all()  # the whole sample at once
    assert 0.35 < (per_sample[:, 0] == 0).float().mean().item() < 0.65
    torch.testing.assert_close(drop.eval()(torch.ones(2, 3)), torch.ones(2, 3))
