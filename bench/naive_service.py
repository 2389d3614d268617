"""(d) in bench/serve_load.py: the most naive BentoML service one could write, as a baseline.

One service, one batchable API taking PIL images, per-request torchvision transforms, the model
loaded from the same store entry. No upload checks, no thread pool, no tuning: what a BentoML
tutorial gives. `bentoml serve bench.naive_service:NaiveViT` (VIT_MODEL_TAG names the model).
"""

from __future__ import annotations

import os

import bentoml
from PIL.Image import Image

TAG = os.environ.get("VIT_MODEL_TAG", "vit-classifier:latest")


@bentoml.service(name="naive_vit", traffic={"timeout": 60, "max_concurrency": 64})
class NaiveViT:
    bento_model = bentoml.models.BentoModel(TAG)

    def __init__(self) -> None:
        import torch
        from torchvision import transforms

        from vit_service.artifact import load_model

        self.torch = torch
        self.model, artifact = load_model(self.bento_model.path)
        self.model.eval()
        pre = artifact.preprocessing
        self.class_names = artifact.class_names
        self.transform = transforms.Compose([
            transforms.Resize(pre.resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(pre.image_size),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ])

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=10_000, route="/classify")
    def classify(self, image: list[Image]) -> list[dict]:
        x = self.torch.stack([self.transform(img.convert("RGB")) for img in image])  # (B, 3, S, S)
        with self.torch.inference_mode():
            probs = self.model(x).softmax(-1)  # (B, K)
        top = probs.topk(min(5, probs.shape[1]), dim=-1)
        return [{"predictions": [{"label": self.class_names[i], "index": int(i), "score": float(s)}
                                 for s, i in zip(scores.tolist(), idx.tolist())]}
                for scores, idx in zip(top.values, top.indices)]
