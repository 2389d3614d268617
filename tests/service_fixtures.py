"""Helpers for the service tests: a tiny model in a temporary model store, a real `bentoml serve`.

`python tests/service_fixtures.py` (with BENTOML_HOME set) saves the tiny model and prints its tag;
the tests run it in a subprocess so the store is the temporary one, whatever this process's
BentoML has already cached.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vit_service.serving.local_server import DEFAULT_TARGET, local_server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_NAME = "vit-classifier"  # the service's default tag, so VIT_MODEL_TAG can stay unset
CLASS_NAMES = ["circle", "square", "triangle", "star"]


def build_tiny_model(seed: int = 0):
    """A random-init ViT for 32 px images, 4 classes, with its artifact."""
    import torch

    from vit_service.artifact import ModelArtifact
    from vit_service.model import ViTConfig, VisionTransformer
    from vit_service.preprocessing import Preprocessing

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, num_classes=4, embed_dim=64, depth=2, num_heads=2)
    model = VisionTransformer(config).eval()
    with torch.no_grad():  # spread the logits so top-1 is decided by the image, not by ties
        model.head.weight.mul_(50.0)
    artifact = ModelArtifact(
        config=config, class_names=list(CLASS_NAMES),
        preprocessing=Preprocessing(image_size=32, crop_pct=1.0),
        metadata={"trained_by": "tests/service_fixtures.py", "val_acc": 0.25, "epochs": 0},
    )
    return model, artifact


def save_tiny_model(bentoml_home: Path) -> str:
    """Saves the tiny model into `bentoml_home` (in a subprocess); returns its full tag."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def bentoml_server(bentoml_home: Path, log_path: Path, env: dict[str, str] | None = None,
                   target: str = DEFAULT_TARGET, ready_timeout: float = 180):
    """A real `bentoml serve` reading the model store at `bentoml_home` (see local_server)."""
    return local_server(log_path, {"BENTOML_HOME": str(bentoml_home), **(env or {})}, target, ready_timeout)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from vit_service.serving.store import save_to_bentoml

    model, artifact = build_tiny_model()
    print(save_to_bentoml(MODEL_NAME, model, artifact).tag)
