"""Which patches drove a prediction: attention rollout and a class-specific gradient method.

- `attention_rollout`: "Quantifying Attention Flow in Transformers" (Abnar & Zuidema, 2020).
  Each block's attention is fused over heads (mean, max or min), its weakest links are optionally
  discarded (`discard_ratio`, as in jacobgil/vit-explain), the residual path is added as 0.5 * I,
  rows are renormalised, and the blocks are multiplied in order. Class-agnostic.
- `gradient_rollout`: the gradient-weighted rule of Chefer, Gur & Wolf, "Generic Attention-model
  Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers" (ICCV 2021), the
  follow-up of their "Transformer Interpretability Beyond Attention Visualization" (CVPR 2021):
  R = I, then per block R += mean_h((dy_c/dA * A)^+) @ R. Class-specific: y_c is the class's logit.

Both read the relevance of the tokens that feed the head: the class token's row for
`global_pool="token"` models, the mean of the patch tokens' rows for `global_pool="avg"` ones.
Both run on the model's explicit-attention path (`VisionTransformer.forward_with_attention`);
the fused kernel that serving uses never materialises attention. Written here rather than taken
from a library: the maintained ones (e.g. pytorch-grad-cam) hook timm's module internals and do
not implement rollout with head fusion and discard on our explicit path.

Shape letters as in model.py; L blocks, Gh x Gw patch grid, M = Gh * Gw patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from vit_service.artifact import ModelArtifact
from vit_service.predictions import classes_preview
from vit_service.model import VisionTransformer

Method = Literal["rollout", "grad"]
HeadFusion = Literal["mean", "max", "min"]
METHODS: tuple[str, ...] = ("rollout", "grad")
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")


def fuse_heads(attn: torch.Tensor, head_fusion: HeadFusion) -> torch.Tensor:
    """(B, h, N, N) -> (B, N, N)."""
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}; got {head_fusion!r}")


def _discard_weakest(a: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zeroes the `ratio` lowest entries of each (N, N) map, never the diagonal."""
    B, N, _ = a.shape
    k = int(N * N * ratio)
    if k == 0:
        return a
    eye = torch.eye(N, dtype=torch.bool, device=a.device)
    flat = a.masked_fill(eye, float("inf")).flatten(1)  # (B, N*N); the diagonal is never lowest
    lowest = flat.topk(k, dim=-1, largest=False).indices  # (B, k)
    return a.flatten(1).scatter(1, lowest, 0.0).view(B, N, N)


def attention_rollout(attentions: list[torch.Tensor], num_prefix_tokens: int, global_pool: str = "token",
                      head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """L attention maps, each (B, h, N, N) -> (B, M) relevance of each patch (unnormalised)."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    B, _, N, _ = attentions[0].shape
    # float32 as the fused maps below, whatever dtype the model ran in
    eye = torch.eye(N, dtype=torch.float32, device=attentions[0].device)
    rollout = eye.expand(B, N, N)
    for attn in attentions:
        a = _discard_weakest(fuse_heads(attn.float(), head_fusion), discard_ratio)  # (B, N, N)
        a = 0.5 * a + 0.5 * eye  # the residual connection carries half of each token's content
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout  # (B, N, N): token i's content traced back to the input tokens
    return _readout(rollout, num_prefix_tokens, global_pool)


def gradient_rollout(attentions: list[torch.Tensor], gradients: list[torch.Tensor], num_prefix_tokens: int,
                     global_pool: str = "token") -> torch.Tensor:
    """Chefer et al.'s rule: L maps and d(class logit)/d(map), each (B, h, N, N) -> (B, M)."""
    B, _, N, _ = attentions[0].shape
    eye = torch.eye(N, dtype=torch.float32, device=attentions[0].device)
    relevance = eye.expand(B, N, N)
    for attn, grad in zip(attentions, gradients):
        a = (grad.float() * attn.float()).clamp(min=0).mean(dim=1)  # (B, N, N)
        relevance = relevance + a @ relevance
    return _readout(relevance, num_prefix_tokens, global_pool)


def _readout(r: torch.Tensor, num_prefix_tokens: int, global_pool: str) -> torch.Tensor:
    """(B, N, N) token-to-input relevance -> (B, M): what the pooled head input draws from each patch."""
    p = num_prefix_tokens
    if global_pool == "token":
        return r[:, 0, p:]  # (B, M) the class token's row
    return r[:, p:, p:].mean(dim=1)  # (B, M) mean-pooled patch tokens


def normalize_map(relevance: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> the same shape scaled to [0, 1] per sample; a flat map becomes all ones."""
    flat = relevance.flatten(1)
    lo = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - lo
    # A span within float rounding of the values is no signal: call the map flat.
    flat_map = span <= 1e-5 * flat.abs().amax(dim=1, keepdim=True)
    flat = torch.where(flat_map, torch.ones_like(flat), (flat - lo) / span.clamp(min=1e-30))
    return flat.view_as(relevance)


def explain_batch(model: VisionTransformer, x: torch.Tensor, method: Method = "rollout",
                  class_index: int | None = None, head_fusion: HeadFusion = "mean",
                  discard_ratio: float = 0.0, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C, H, W) normalised images -> probabilities softmax(logits / temperature) (B, K), explained
    class (B,), maps (B, Gh, Gw) in [0, 1].

    `class_index` None explains each image's top class (rollout ignores the class: it is class-agnostic).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    P = model.config.patch_size
    grid = (x.shape[-2] // P, x.shape[-1] // P)
    pool, prefix = model.config.global_pool, model.num_prefix_tokens
    was_training = model.training
    model.eval()
    try:
        if method == "rollout":
            logits, attentions = model.attention_maps(x)
            target = logits.argmax(-1) if class_index is None else torch.full_like(logits[:, 0], class_index, dtype=torch.long)
            relevance = attention_rollout(attentions, prefix, pool, head_fusion, discard_ratio)
        else:
            with torch.enable_grad():
                logits, attentions = model.forward_with_attention(x)
                target = logits.argmax(-1) if class_index is None else torch.full_like(logits[:, 0], class_index, dtype=torch.long)
                chosen = logits.gather(1, target[:, None]).sum()  # samples are independent: one backward
                # Gradients for the attention maps only; the parameters' .grad stay untouched, so
                # this can run beside inference on the same model.
                gradients = torch.autograd.grad(chosen, attentions)
            relevance = gradient_rollout([a.detach() for a in attentions], list(gradients), prefix, pool)
    finally:
        model.train(was_training)
    probs = (logits.detach().float() / temperature).softmax(dim=-1)
    maps = normalize_map(relevance.detach()).view(-1, *grid)  # (B, Gh, Gw)
    return probs, target.detach(), maps


@dataclass
class Explanation:
    """One image's explanation: the patch grid over the model's crop, and the predictions."""

    grid: np.ndarray  # (Gh, Gw) float32 in [0, 1]
    probs: np.ndarray  # (K,) float32 softmax(logits / T), as served
    class_index: int  # the class the map explains (the top class unless one was asked for)
    method: str
    crop_box: tuple[float, float, float, float]  # (left, top, right, bottom) of the crop in the image


class Explainer:
    """A model and its artifact, explaining decoded RGB images with the artifact's preprocessing; its
    probabilities are the served ones: divided by the artifact's temperature unless calibrated=False."""

    def __init__(self, model: VisionTransformer, artifact: ModelArtifact,
                 device: str | torch.device = "cpu", calibrated: bool = True) -> None:
        self.device = torch.device(device)
        self.temperature = artifact.temperature if calibrated else 1.0
        self.model = model.to(self.device).eval()
        self.artifact = artifact
        self.preprocessing = artifact.preprocessing

    @property
    def class_names(self) -> list[str]:
        return list(self.artifact.class_names)

    def class_index(self, label: str | int | None) -> int | None:
        """A class name (or index) -> its index; ValueError naming the choices when unknown."""
        if label is None or isinstance(label, int):
            if isinstance(label, int) and not 0 <= label < len(self.class_names):
                raise ValueError(f"class index {label} out of range 0..{len(self.class_names) - 1}")
            return label
        if label in self.class_names:
            return self.class_names.index(label)
        raise ValueError(f"unknown class {label!r}; the model's classes are: {classes_preview(self.class_names)}")

    def explain_uint8(self, pixels: torch.Tensor | np.ndarray, method: Method = "rollout",
                      class_index: int | None = None, head_fusion: HeadFusion = "mean",
                      discard_ratio: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, 3, S, S) uint8 (as serving prepares them) -> probs (B, K), classes (B,), maps (B, Gh, Gw)."""
        x = torch.as_tensor(np.asarray(pixels)).to(self.device)
        x = self.preprocessing.normalize(x)  # (B, 3, S, S) float32
        probs, target, maps = explain_batch(self.model, x, method, class_index, head_fusion, discard_ratio,
                                            self.temperature)
        return probs.cpu().numpy(), target.cpu().numpy(), maps.cpu().numpy().astype(np.float32)

    def explain_image(self, image: Image.Image, method: Method = "rollout", class_index: int | None = None,
                      head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0) -> Explanation:
        pixels = self.preprocessing.to_uint8(image)[None]  # (1, 3, S, S)
        probs, target, maps = self.explain_uint8(pixels, method, class_index, head_fusion, discard_ratio)
        return Explanation(maps[0], probs[0], int(target[0]), method, self.preprocessing.crop_box(*image.size))


def peak_point(grid: np.ndarray, box: tuple[float, float, float, float]) -> tuple[float, float]:
    """The centre of the grid's highest patch, in the image's pixels (the pointing game's guess)."""
    gh, gw = grid.shape
    r, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
    left, top, right, bottom = box
    return (left + (c + 0.5) / gw * (right - left), top + (r + 0.5) / gh * (bottom - top))


__all__ = ["attention_rollout", "gradient_rollout", "fuse_heads", "normalize_map", "explain_batch",
           "Explainer", "Explanation", "peak_point", "METHODS", "HEAD_FUSIONS"]
