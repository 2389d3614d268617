"""Helpers for the service tests: a tiny model in a temporary model store, a real `bentoml serve`.

`python tests/service_fixtures.py` (with BENTOML_HOME set) saves the tiny model and prints its tag;
the tests run it in a subprocess so the store is the temporary one, whatever this process's
BentoML has already cached.
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps, features

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python tests/service_fixtures.py` imports bench/ too

from bench.local_server import DEFAULT_TARGET, local_server  # noqa: E402
from vit_service.host import read_cpu  # noqa: E402
BIN = Path(sys.executable).parent
# Fake CPUs for the host decisions, as /proc/cpuinfo would describe them.
AVX2_ONLY = read_cpu("model name\t: AMD EPYC 7B12\nflags\t\t: sse2 avx avx2 fma\n")
WITH_BF16 = read_cpu("model name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n")
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
        metadata={"trained_by": "tests/service_fixtures.py", "val_acc": 0.25, "epochs": 0,
                  "_instantiator": "lightning.pytorch.cli.instantiate_module"},  # internal: /model_info hides it
    )
    return model, artifact


def save_tiny_folder(folder: Path) -> Path:
    """The tiny model saved as an exported model folder (as `vit-export --dir` writes one)."""
    model, artifact = build_tiny_model()
    artifact.save(model, folder)
    return folder


def save_tiny_model(bentoml_home: Path) -> str:
    """Saves the tiny model into `bentoml_home` (in a subprocess); returns its full tag."""
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@functools.cache
def _tiny_model_template() -> tuple[Path, str]:
    """A store holding the tiny model, saved once per test process: (its home, the tag)."""
    home = Path(tempfile.mkdtemp(prefix="vit-tiny-store-"))
    atexit.register(shutil.rmtree, home, True)
    return home, save_tiny_model(home)


def copy_tiny_model(bentoml_home: Path) -> str:
    """The tiny model put into a new store at `bentoml_home`: a copy of the files save_tiny_model
    wrote once in this process (the same model and tag) instead of another ~5 s subprocess. Only
    models/ is copied (the servers' Prometheus files live beside it). For a store's first model;
    a new version in a store uses save_tiny_model."""
    template, tag = _tiny_model_template()
    assert not (bentoml_home / "models").exists(), bentoml_home
    shutil.copytree(template / "models", bentoml_home / "models")
    return tag


def bentoml_server(bentoml_home: Path, log_path: Path, env: dict[str, str] | None = None,
                   target: str = DEFAULT_TARGET, ready_timeout: float = 180, ready_path: str = "/readyz"):
    """A real `bentoml serve` reading the model store at `bentoml_home` (see local_server)."""
    return local_server(log_path, {"BENTOML_HOME": str(bentoml_home), **(env or {})}, target, ready_timeout,
                        ready_path=ready_path)


# ----------------------------------------------------------------------------------- images

def wait_warm(model, timeout: float = 300) -> None:
    """Until an InProcessModel's warm-up has finished: a failed warm-up (the model stays unready,
    `failed` set) fails at once instead of waiting out the timeout for a `warm` that never comes."""
    deadline = time.monotonic() + timeout
    while not model.warm.wait(0.05) and not model.failed and time.monotonic() < deadline:
        pass
    assert model.warm.is_set(), "the warm-up failed (its traceback is in the log)" if model.failed else "no warm-up"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def picture(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A random but structured RGB picture: noise plus a few coloured shapes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(base // 2 + rng.integers(0, 128, size=3, dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        w, h = max(2, size[0] // 2), max(2, size[1] // 2)
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(1, w)), y0 + int(rng.integers(1, h))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 255, size=3)))
    return img


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data: a decompression-bomb probe."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _see_through(rgb: Image.Image) -> Image.Image:
    """The picture with its left half fully transparent and an alpha ramp across the rest."""
    rgba = np.asarray(rgb.convert("RGBA")).copy()
    w = rgba.shape[1]
    rgba[:, :, 3] = np.clip(np.linspace(-255, 255, w), 0, 255).astype(np.uint8)[None, :]
    return Image.fromarray(rgba, "RGBA")


@functools.cache
def unusual_images() -> dict[str, tuple[bytes, str]]:
    """Valid images a user may well send: name -> (bytes, declared content type)."""
    rgb = picture(7)
    cases = {
        "grayscale.png": (encode(rgb.convert("L"), "PNG"), "image/png"),
        "palette.png": (encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "image/png"),
        "palette_transparent.gif": (encode(rgb.convert("P"), "GIF", transparency=0), "image/gif"),
        "rgba.png": (encode(rgb.convert("RGBA"), "PNG"), "image/png"),
        "rgba_see_through.png": (encode(_see_through(rgb), "PNG"), "image/png"),  # shown over white
        "cmyk.jpg": (encode(rgb.convert("CMYK"), "JPEG"), "image/jpeg"),
        "16bit.png": (encode(Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)), "PNG"), "image/png"),
        "tiny_1x1.png": (encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "image/png"),
        "very_wide.jpg": (encode(picture(8, (2000, 12)), "JPEG"), "image/jpeg"),
        "very_tall.png": (encode(picture(9, (5, 900)), "PNG"), "image/png"),
        "png_labelled_jpeg": (encode(rgb, "PNG"), "image/jpeg"),
        "jpeg_no_type": (encode(rgb, "JPEG"), "application/octet-stream"),
        "big_photo.jpg": (encode(picture(10, (1600, 1200)), "JPEG", quality=90), "image/jpeg"),
    }
    frames = [picture(11), picture(12)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cases["animated.gif"] = (buf.getvalue(), "image/gif")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    cases["exif_rotated.jpg"] = (encode(picture(13, (120, 40)), "JPEG", exif=exif.tobytes()), "image/jpeg")
    cases["photo.bmp"] = (encode(rgb, "BMP"), "image/bmp")
    cases["photo.tiff"] = (encode(rgb, "TIFF", compression="tiff_lzw"), "image/tiff")
    if features.check("webp"):
        cases["photo.webp"] = (encode(rgb, "WEBP"), "image/webp")
    return cases


# --------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A temporary BENTOML_HOME holding the tiny model; returns (home, full tag)."""
    home = tmp_path_factory.mktemp("bentoml_home")
    return home, copy_tiny_model(home)


def reference_pixels(data: bytes, size: int, mean, std):
    """An upload decoded and transformed with PIL and torchvision alone, independently of the
    project's decode_image and Preprocessing, by the README's rules: the first frame, EXIF
    orientation applied, transparency over white, 16-bit scaled to 8, any mode to RGB, a JPEG
    decoded at reduced scale down to >= size px (DCT draft, as the service does); then the shorter
    side resized to `size` (bicubic; crop_pct 1), centre-cropped, normalised. -> (3, S, S) float."""
    import torch
    from torchvision.transforms import v2

    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", (size, size))
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(arr / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")
    tf = v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(size),
                     v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    return tf(img)


@pytest.fixture(scope="session")
def reference(store):
    """The exported model run directly on an independently decoded upload (reference_pixels):
    the oracle for what the server answers."""
    import torch

    from vit_service.artifact import load_model

    home, tag = store
    name, version = tag.split(":")
    model, artifact = load_model(home / "models" / name / version)
    pre = artifact.preprocessing
    assert pre.crop_pct == 1.0 and pre.interpolation == "bicubic" and pre.crop_mode == "center"

    def probs(data: bytes) -> np.ndarray:
        with torch.no_grad():
            return model(reference_pixels(data, pre.image_size, pre.mean, pre.std)[None]).softmax(-1)[0].numpy()

    return probs


def classify(client: httpx.Client, data: bytes, name: str = "x.jpg", ctype: str = "image/jpeg", **form) -> httpx.Response:
    return client.post("/classify", files={"image": (name, data, ctype)}, data=form)


def classify_all_at_once(url: str, images: list[bytes]) -> list[httpx.Response]:
    """POSTs every image to /classify from its own client, all released together by a barrier,
    so the requests really are concurrent (what adaptive batching needs)."""
    barrier = threading.Barrier(len(images))

    def one(data: bytes) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as c:
            barrier.wait()
            return classify(c, data)

    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(one, images))


def check_predictions(preds: list[dict], k: int) -> None:
    assert len(preds) == k
    for p in preds:
        assert set(p) == {"label", "index", "score"}
        assert CLASS_NAMES[p["index"]] == p["label"]
        assert 0.0 <= p["score"] <= 1.0
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True)
    assert len({p["index"] for p in preds}) == k


def assert_matches(preds: list[dict], probs: np.ndarray) -> None:
    assert preds[0]["index"] == int(np.argmax(probs))
    for p in preds:
        # fp32 on both sides; only the batch composition differs (summation order): ~1e-7.
        assert p["score"] == pytest.approx(float(probs[p["index"]]), abs=1e-5)


def read_http_response(sock: socket.socket) -> tuple[str, bytes]:
    """Reads one HTTP/1.1 response with a Content-Length from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, body
        body += chunk
    return head.decode().split("\r\n")[0], body

def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` carrying all `labels` (0 when none), from /metrics' text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def batch_histogram(client: httpx.Client) -> tuple[float, float, float]:
    """(forward passes, images in them, passes of exactly one image) from `vit_batch_size` on
    /metrics (in split mode the model service's; all workers share one Prometheus dir)."""
    text = client.get("/metrics").text

    def total(series: str, labels: str = "") -> float:
        pattern = rf'vit_batch_size_{series}(?:\{{{labels}[^}}]*\}})? (\S+)'
        return sum(float(v) for v in re.findall(pattern, text))

    return total("count"), total("sum"), total("bucket", 'le="1.0"')


def poll(call, until, attempts: int = 400):
    """Calls `call()` until `until(result)` holds (or `attempts` run out); returns the last result."""
    for _ in range(attempts):
        result = call()
        if until(result):
            return result
        time.sleep(0.05)  # pacing between attempts, not a synchronisation: the condition decides
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from vit_service.serving.store import save_to_bentoml

    model, artifact = build_tiny_model()
    print(save_to_bentoml(MODEL_NAME, model, artifact).tag)
