"""Helpers for the service tests: a tiny model in a temporary model store, a real `bentoml serve`.

`python tests/service_fixtures.py` (with BENTOML_HOME set) saves the tiny model and prints its tag;
the tests run it in a subprocess so the store is the temporary one, whatever this process's
BentoML has already cached.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def bentoml_server(bentoml_home: Path, log_path: Path, env: dict[str, str] | None = None,
                   target: str = "vit_service.service:ViTClassifier", ready_timeout: float = 180) -> Iterator[str]:
    """`bentoml serve target` on a free loopback port; yields its URL once /readyz answers 200.

    The server runs in its own process group, which is always terminated afterwards.
    """
    port = free_port()
    full_env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true",
                "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready in {ready_timeout} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from vit_service.store import save_to_bentoml

    model, artifact = build_tiny_model()
    print(save_to_bentoml(MODEL_NAME, model, artifact).tag)
