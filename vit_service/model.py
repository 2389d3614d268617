"""Vision Transformer, written from scratch in plain PyTorch.

"An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(Dosovitskiy et al., 2021), https://arxiv.org/abs/2010.11929, with the pre-norm blocks and
initialisation of timm's `VisionTransformer`. Parameter names equal timm's, so timm checkpoints
load as they are and timm is the oracle in the tests.

Shape letters:
    B batch, C channels, H/W image height/width, P patch size, Gh/Gw patch grid,
    N tokens (patches + class token), D width, h heads, d head width (D / h).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-6


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0  # dropout after pos-embed, in MLPs, after attention proj and before head
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over the blocks
    global_pool: Literal["token", "avg"] = "token"
    class_token: bool = True
    init_values: float | None = None  # LayerScale init (CaiT/DeiT-III); None disables it
    norm_eps: float = LN_EPS  # LayerNorm epsilon: timm's 1e-6; Hugging Face ViT checkpoints use 1e-12

    def __post_init__(self) -> None:
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ViTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown ViT preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        return cls(**d)


PRESETS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch16_384": ViTConfig(image_size=384, embed_dim=768, depth=12, num_heads=12),
    # CIFAR-sized: 32 px images, 4 px patches -> 8x8 grid, 65 tokens.
    "vit_cifar_patch4_32": ViTConfig(
        image_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=9, num_heads=3,
        mlp_ratio=2.0,
    ),
    # Tiny demo model: trains to high accuracy on the generated demo set in minutes on a CPU.
    "vit_demo_patch8_64": ViTConfig(
        image_size=64, patch_size=8, num_classes=6, embed_dim=96, depth=4, num_heads=3,
        mlp_ratio=2.0, global_pool="avg",
    ),
}


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Resizes (1, prefix + Gh*Gw, D) position embeddings to a new square or rectangular grid.

    Bicubic with antialiasing, prefix (class) tokens kept apart, as timm's resample_abs_pos_embed.
    The old grid is assumed square, which holds for every checkpoint this project reads.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embeddings of {grid.shape[1]} patches are not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dtype = grid.dtype
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()  # (1, D, G, G)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(dtype)  # (1, Gh*Gw, D)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """Cuts the image into PxP patches and projects each to D with one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        B, C, H, W = x.shape
        if C != self.in_chans:
            raise ValueError(f"expected {self.in_chans} channels, got {C} (input shape {tuple(x.shape)})")
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the patch size {self.patch_size}"
            )
        x = self.proj(x)  # (B, D, Gh, Gw)
        return x.flatten(2).transpose(1, 2)  # (B, Gh*Gw, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        attn = None
        if return_attn:
            # The explicit path, only for visualisation: the fused kernel never materialises the
            # attention matrix, so the default path below stays fused and fast.
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, N, N)
            x = F.dropout(attn, self.attn_drop, self.training) @ v  # (B, h, N, d)
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop if self.training else 0.0
            )  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj_drop(self.proj(x)), attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample (Huang et al., 2016)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn = Attention(D, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        self.ls1 = LayerScale(D, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio), cfg.drop_rate)
        self.ls2 = LayerScale(D, cfg.init_values) if cfg.init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))[0]))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_with_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(self.norm1(x), return_attn=True)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), attn


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        D = cfg.embed_dim
        self.num_prefix_tokens = 1 if cfg.class_token else 0
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + cfg.grid_size**2, D))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # drop-path decay (on the CPU, also in a meta build)
        self.blocks = nn.Sequential(*[Block(cfg, dpr[i]) for i in range(cfg.depth)])
        # timm's naming: with mean pooling the final norm is applied after pooling ("fc_norm").
        use_fc_norm = cfg.global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        if self.pos_embed.is_meta:  # a build for shapes, or for weights about to be assigned
            # Meta tensors hold no values; drawing them runs through torch._refs, whose first use
            # imports torch._dynamo (~0.9 s of every model-loading process's start).
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter grouping (stem, blocks, final norm), used for layer-wise LR decay."""
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward: less memory, about 30% more compute."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.config = replace(self.config, num_classes=num_classes)
        D = self.config.embed_dim
        device = self.pos_embed.device
        self.head = nn.Linear(D, num_classes, device=device) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_linear)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos_embed = self.pos_embed
        if grid != (self.config.grid_size, self.config.grid_size):
            # Another input size: resample the learned grid on the fly (as timm's dynamic_img_size).
            pos_embed = resample_pos_embed(pos_embed, grid, self.num_prefix_tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D)
        return self.pos_drop(x + pos_embed)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)  # (B, Gh*Gw, D); anything but (B, C, H, W) is refused there
        P = self.config.patch_size
        return self._pos_embed(tokens, (x.shape[-2] // P, x.shape[-1] // P))  # (B, N, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, D) tokens after the final norm."""
        x = self._embed(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.config.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)  # (B, D)
        else:
            x = x[:, 0]  # (B, D) class token
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and every block's attention probabilities, each (B, h, N, N), for visualisation.

        Uses the explicit softmax(QK^T) path; `forward` keeps the fused kernel.
        """
        return self.forward_with_attention(x)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`attention_maps` inside autograd: the maps stay in the graph, so gradient-based
        explanations can take d(logit)/d(attention) with `torch.autograd.grad`."""
        x = self._embed(x)
        maps = []
        for blk in self.blocks:
            x, attn = blk.forward_with_attn(x)
            maps.append(attn)
        return self.forward_head(self.norm(x)), maps


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ViTConfig", "PRESETS", "VisionTransformer", "resample_pos_embed", "count_parameters"]
