"""(f) in bench/serve_load.py: a LitServe service written as LitServe's docs show, the peer a user
would pick instead of ours.

A `LitAPI` with the four methods of LitServe's examples: `setup` loads the model, `decode_request`
opens the upload with PIL and applies timm's eval transform (per request, in the API process's
request path), `predict` runs the batch LitServe assembled (`max_batch_size=16`,
`batch_timeout=0.01`), `encode_response` answers top-5 JSON. The model is the one the other setups
serve, read from its model folder with our artifact loader, so only the serving differs.
No upload checks, no tuning: what LitServe's image-classification examples give.

    python bench/litserve_service.py --model-dir DIR --port 8000   # DIR: a BentoML model folder
    curl -F image=@cat.jpg http://127.0.0.1:8000/classify
"""

from __future__ import annotations

import argparse
import os

import litserve as ls
import torch
from PIL import Image


class ViTLitAPI(ls.LitAPI):
    def __init__(self, model_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        from timm.data import create_transform

        from vit_service.artifact import load_model

        self.device = device
        model, artifact = load_model(self.model_dir)
        self.model = model.to(device).eval()
        self.class_names = artifact.class_names
        pre = artifact.preprocessing
        self.transform = create_transform(input_size=(3, pre.image_size, pre.image_size), is_training=False,
                                          interpolation=pre.interpolation, mean=pre.mean, std=pre.std,
                                          crop_pct=pre.crop_pct)

    def decode_request(self, request) -> torch.Tensor:
        upload = request["image"]  # multipart form field "image": a starlette UploadFile
        return self.transform(Image.open(upload.file).convert("RGB"))  # (3, S, S) float

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)  # (B, 3, S, S)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x.to(self.device)).softmax(-1).cpu()  # (B, K)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probs: torch.Tensor) -> dict:
        top = probs.topk(min(5, probs.shape[0]))
        return {"predictions": [{"label": self.class_names[i], "index": int(i), "score": float(s)}
                                for s, i in zip(top.values.tolist(), top.indices.tolist())]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=os.environ.get("VIT_MODEL_DIR"),
                   help="model folder (a BentoML store entry or vit-export output); default $VIT_MODEL_DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--accelerator", default="auto", help="cpu | cuda | auto")
    args = p.parse_args()
    if not args.model_dir:
        p.error("--model-dir (or VIT_MODEL_DIR) is required")
    api = ViTLitAPI(args.model_dir, max_batch_size=16, batch_timeout=0.01, api_path="/classify")
    server = ls.LitServer(api, accelerator=args.accelerator, timeout=60)
    server.run(host=args.host, port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
