"""Attention rollout and the gradient method on hand-built attention, on a real model, and the
`vit-explain` CLI run for real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli, run_cli_in_process
from vit_service.explain import (Explainer, attention_rollout, explain_batch, gradient_rollout,
                                 normalize_map, peak_point)
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.overlay import colorize, legend_height, render_overlay
from vit_service.preprocessing import Preprocessing

G = 4  # 4 x 4 patch grid
M = G * G


def _uniform(B: int = 2, heads: int = 3, prefix: int = 1, layers: int = 3) -> list[torch.Tensor]:
    N = prefix + M
    return [torch.full((B, heads, N, N), 1.0 / N) for _ in range(layers)]


def _attend_to(patch: int, prefix: int = 1, heads: int = 3, layers: int = 3, rows: str = "cls") -> list[torch.Tensor]:
    """Every token attends to itself, except `rows` ("cls": the class token; "patches": every
    patch token) which attend only to patch `patch`."""
    N = prefix + M
    a = torch.eye(N).repeat(1, heads, 1, 1)  # (1, h, N, N)
    selected = [0] if rows == "cls" else list(range(prefix, N))
    for i in selected:
        a[:, :, i] = 0.0
        a[:, :, i, prefix + patch] = 1.0
    return [a.clone() for _ in range(layers)]


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("pool,prefix", [("token", 1), ("avg", 1), ("avg", 0)])
def test_uniform_attention_gives_a_uniform_map(fusion: str, pool: str, prefix: int) -> None:
    rel = attention_rollout(_uniform(prefix=prefix), prefix, pool, fusion)
    assert rel.shape == (2, M)
    assert torch.allclose(rel, rel[:, :1].expand_as(rel), atol=1e-6)
    assert torch.equal(normalize_map(rel), torch.ones_like(rel))


@pytest.mark.parametrize("discard", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_class_token_attending_to_one_patch_points_at_it(fusion: str, discard: float) -> None:
    rel = attention_rollout(_attend_to(patch=6), 1, "token", fusion, discard)
    grid = normalize_map(rel).view(-1, G, G)[0]
    assert np.unravel_index(int(grid.argmax()), (G, G)) == (1, 2)  # patch 6 = row 1, col 2
    assert grid[1, 2] == 1.0 and float(grid.flatten().sort().values[-2]) < 0.5


def test_mean_pooled_model_reads_the_patch_rows() -> None:
    rel = attention_rollout(_attend_to(patch=11, rows="patches"), 1, "avg")
    assert int(rel[0].argmax()) == 11
    # ...while the class token's row (unused by an avg-pool head) says nothing about patch 11.
    rel_cls = attention_rollout(_attend_to(patch=11, rows="patches"), 1, "token")
    assert int(rel_cls[0].argmax()) != 11 or float(rel_cls[0].max() - rel_cls[0].min()) < 1e-6


def test_head_fusions_differ_when_heads_disagree() -> None:
    N = 1 + M
    a = torch.eye(N).repeat(1, 2, 1, 1)  # (1, 2, N, N)
    a[0, :, 0] = 0.0
    a[0, 0, 0, 1 + 3], a[0, 0, 0, 1 + 7] = 0.8, 0.2  # head 0: the class token looks at patches 3, 7
    a[0, 1, 0, 1 + 7], a[0, 1, 0, 1 + 9] = 0.3, 0.7  # head 1: at patches 7, 9
    peaks = {f: int(attention_rollout([a], 1, "token", f).argmax()) for f in ("mean", "max", "min")}
    assert peaks == {"mean": 3, "max": 3, "min": 7}  # min keeps what every head agrees on


def test_gradient_rollout_follows_positive_gradient_times_attention() -> None:
    attn = _uniform(B=1)
    grads = [torch.zeros_like(a) for a in attn]
    grads[-1][0, :, 0, 1 + 9] = 5.0  # only the class token's link to patch 9 raises the logit
    rel = gradient_rollout(attn, grads, 1, "token")
    assert int(rel[0].argmax()) == 9
    negative = [-g for g in grads]  # negative evidence is clamped away: a flat map
    rel = gradient_rollout(attn, negative, 1, "token")
    assert torch.allclose(rel, rel[:, :1].expand_as(rel))


@pytest.fixture(scope="module")
def model() -> VisionTransformer:
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(image_size=32, patch_size=8, num_classes=3, embed_dim=48, depth=2, num_heads=3))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def test_explicit_attention_path_matches_forward(model: VisionTransformer) -> None:
    x = torch.randn(2, 3, 32, 32)
    logits, maps = model.forward_with_attention(x)
    assert torch.allclose(logits, model(x), atol=1e-5)
    assert len(maps) == 2 and maps[0].shape == (2, 3, 17, 17) and maps[0].requires_grad  # in the graph


@pytest.mark.parametrize("method", ["rollout", "grad"])
def test_explain_batch_shapes_and_range(model: VisionTransformer, method: str) -> None:
    x = torch.randn(2, 3, 32, 48)  # another size: a 4 x 6 grid
    probs, target, maps = explain_batch(model, x, method)
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.equal(target, probs.argmax(-1))
    assert maps.shape == (2, 4, 6) and float(maps.min()) >= 0.0 and float(maps.max()) == 1.0
    assert all(p.grad is None for p in model.parameters())  # parameters' grads untouched


def test_grad_method_is_class_specific(model: VisionTransformer) -> None:
    x = torch.randn(1, 3, 32, 32)
    maps = [explain_batch(model, x, "grad", class_index=c)[2] for c in range(3)]
    assert not torch.allclose(maps[0], maps[1]) and not torch.allclose(maps[1], maps[2])
    rollouts = [explain_batch(model, x, "rollout", class_index=c)[2] for c in range(2)]
    assert torch.equal(rollouts[0], rollouts[1])  # rollout is class-agnostic


@pytest.mark.parametrize("size,crop_pct,crop_mode,expected", [
    ((100, 100), 1.0, "center", (0, 0, 100, 100)),
    ((100, 200), 1.0, "center", (0, 50, 100, 150)),
    ((300, 150), 1.0, "center", (75, 0, 225, 150)),
    ((64, 64), 0.5, "center", (16, 16, 48, 48)),
    ((400, 200), 1.0, "center", (100, 0, 300, 200)),
    # squash (every transformers-folder model): both sides resized, so the whole upload is seen
    ((400, 200), 1.0, "squash", (0, 0, 400, 200)),
    ((400, 200), 0.5, "squash", (100, 50, 300, 150)),
    ((90, 300), 0.875, "squash", (5, 16.7, 85, 283.3)),
])
def test_crop_box_is_the_region_the_model_sees(size: tuple[int, int], crop_pct: float, crop_mode: str,
                                               expected: tuple) -> None:
    pre = Preprocessing(image_size=32, crop_pct=crop_pct, crop_mode=crop_mode)
    box = pre.crop_box(*size)
    assert np.allclose(box, expected, atol=1.0)
    # And it agrees with the transform itself: a white rectangle drawn exactly on the box fills the
    # crop, and one drawn everywhere but the box leaves the crop's inside black.
    img = Image.new("RGB", size, (0, 0, 0))
    img.paste((255, 255, 255), tuple(round(v) for v in box))
    assert np.asarray(pre.resize_crop(img))[2:-2, 2:-2].min() > 200
    inverse = Image.new("RGB", size, (255, 255, 255))
    inverse.paste((0, 0, 0), tuple(round(v) for v in box))
    assert np.asarray(pre.resize_crop(inverse))[2:-2, 2:-2].max() < 55


def test_peak_point_maps_the_patch_centre_into_the_image() -> None:
    grid = np.zeros((4, 4), np.float32)
    grid[3, 0] = 1.0
    assert peak_point(grid, (10, 20, 50, 60)) == (15.0, 55.0)


# --- vit-explain, for real -------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.service_fixtures import build_tiny_model

    model, artifact = build_tiny_model()
    return artifact.save(model, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("wide.jpg", (120, 60)), ("tall.png", (40, 80))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
        paths.append(root / name)
    return paths


def test_overlay_tints_by_relevance_and_carries_its_colour_bar() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(40, 216, (256, 512, 3), dtype=np.uint8)  # 512 px wide: drawn at its own size
    image = Image.fromarray(pixels)
    box = (128, 0, 384, 256)  # the centre crop: 4x4 patches of 64 px
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[0, 0] = 1.0
    out = np.asarray(render_overlay(image, grid, box, alpha=0.7)).astype(int)
    assert out.shape[1] == 512 and out.shape[0] == 256 + legend_height(512) > 256  # the legend strip below
    # A patch of zero relevance far from the relevant one: the image as it is, not darkened or tinted.
    quiet = (slice(200, 250), slice(128 + 200, 128 + 250))
    assert np.abs(out[quiet] - pixels[quiet].astype(int)).max() <= 1
    # The relevant patch's outer quarter (relevance 1 up to its centre: it is the grid's corner):
    # 70% the colormap's top colour over 30% of the image.
    hot = (slice(8, 32), slice(128 + 8, 128 + 32))
    expected = 0.3 * pixels[hot] + 0.7 * colorize(np.ones(1))[0]
    assert np.abs(out[hot] - expected).max() <= 3 and np.abs(out[hot] - pixels[hot].astype(int)).mean() > 20

    # The colour bar runs along the colormap over the grid's range (here 0.2 to 0.8), left to right.
    grid = np.linspace(0.2, 0.8, 16, dtype=np.float32).reshape(4, 4)
    strip = np.asarray(render_overlay(image, grid, box))[256:].astype(int)
    scale = colorize(np.linspace(0.0, 1.0, 256)).astype(int)  # (256, 3)

    def along_the_colormap(row: np.ndarray) -> np.ndarray | None:
        """The colormap position of each pixel of the row's middle 80%, if every one is a colormap colour."""
        middle = row[len(row) // 10: len(row) * 9 // 10]
        distance = np.abs(middle[:, None, :] - scale[None, :, :]).sum(-1)  # (pixels, 256)
        return distance.argmin(1) / 255 if distance.min(1).max() <= 6 else None

    bars = [t for t in map(along_the_colormap, strip) if t is not None]
    assert bars, "no row of the legend strip is a colour bar"
    t = bars[len(bars) // 2]
    assert np.all(np.diff(t) >= 0) and t[0] == pytest.approx(0.2 + 0.6 * 0.1, abs=0.03)
    assert t[-1] == pytest.approx(0.8 - 0.6 * 0.1, abs=0.03)


def test_cli_writes_overlay_grid_and_json(images: list[Path], tmp_path: Path) -> None:
    from tests.service_fixtures import copy_tiny_model

    home = tmp_path / "bentoml_home"
    copy_tiny_model(home)  # as vit-classifier, then named by its tag as in the README
    out = tmp_path / "out"
    r = run_cli("vit-explain", *map(str, images), "--model", "vit-classifier:latest", "--out", str(out),
                env={"BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"})
    assert r.returncode == 0, r.stderr
    for path in images:
        overlay = Image.open(out / f"{path.stem}.png")
        w, h = Image.open(path).size
        picture_h = overlay.height - legend_height(overlay.width)  # the legend strip is below the picture
        assert abs(overlay.width / picture_h - w / h) < 0.02  # the upload's aspect ratio
        record = json.loads((out / f"{path.stem}.json").read_text())
        grid = np.load(out / f"{path.stem}.npy")
        assert grid.shape == (4, 4) == tuple(record["grid_shape"]) and 0.0 <= grid.min() and grid.max() == 1.0
        assert np.allclose(np.array(record["grid"]), grid, atol=1e-4)
        assert record["method"] == "rollout" and record["predictions"][0]["label"] == record["explained_class"]
        assert f"{path}: {record['predictions'][0]['label']}" in r.stdout


def test_cli_grad_explains_a_chosen_class(artifact_dir: Path, images: list[Path], tmp_path: Path) -> None:
    from vit_service.explain_cli import main  # in-process (an exported folder): the subprocess path is covered above

    assert main([str(images[0]), "--model", str(artifact_dir), "--method", "grad", "--class", "star",
                 "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "wide.json").read_text())
    assert record["explained_class"] == "star" and record["method"] == "grad"


def test_cli_takes_folders_as_vit_train_predict_does(artifact_dir: Path, images: list[Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from vit_service.explain_cli import main

    folder = images[0].parent
    assert main([str(folder), "--model", str(artifact_dir), "--out", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{p.stem}{ext}" for p in images for ext in (".png", ".json", ".npy"))  # every image, named as today
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--model", str(artifact_dir), "--out", str(tmp_path / "o2")]) == 2
    assert "empty: a folder with no image files in it" in capsys.readouterr().err


def test_cli_error_is_one_line_naming_the_file(artifact_dir: Path, tmp_path: Path) -> None:
    r = run_cli_in_process("vit-explain", str(tmp_path / "nope.jpg"), "--model", str(artifact_dir),
                           "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("vit-explain: error:") and "nope.jpg" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["text", "class", "model"])
def test_cli_errors_name_the_problem(artifact_dir: Path, images: list[Path], tmp_path: Path, problem: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from vit_service.explain_cli import main

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    args = {"text": [str(text), "--model", str(artifact_dir)],
            "class": [str(images[0]), "--model", str(artifact_dir), "--class", "giraffe"],
            "model": [str(images[0]), "--model", str(tmp_path)]}[problem]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    named = {"text": "notes.txt: not a recognised image format", "class": "giraffe", "model": str(tmp_path)}[problem]
    assert err.startswith("vit-explain: error:") and named in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_explainer_from_tiny_artifact_uses_its_preprocessing(artifact_dir: Path) -> None:
    from vit_service.artifact import load_model

    explainer = Explainer(*load_model(artifact_dir))
    ex = explainer.explain_image(Image.new("RGB", (64, 32), (200, 10, 10)), "grad")
    assert ex.grid.shape == (4, 4) and ex.crop_box == (16.0, 0.0, 48.0, 32.0)
    assert explainer.class_index("square") == 1
    with pytest.raises(ValueError, match="giraffe"):
        explainer.class_index("giraffe")


def test_vit_explain_imports_no_training_stack() -> None:
    import subprocess
    import sys

    code = ("import sys, vit_service.explain_cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'training'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_vit_explain_command_reads_run_folders_without_lightning(trained_run: Path, demo_data: Path,
                                                                    tmp_path: Path) -> None:
    import subprocess
    import sys

    # The installed command is training/explain_cli.py's: vit_service's CLI with run folders first.
    code = ("import sys, training.explain_cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    from training.run_checkpoints import MODEL_FORMATS
    from vit_service.explain_cli import main

    image = demo_data / "val" / "circle" / "00000.jpg"
    assert main([str(image), "--model", str(trained_run), "--out", str(tmp_path)], formats=MODEL_FORMATS) == 0
    assert (tmp_path / "00000.png").is_file()


def test_cli_reads_a_vit_train_checkpoint(trained_run: Path, demo_data: Path, tmp_path: Path) -> None:
    from vit_service.explain_cli import main

    image = demo_data / "val" / "circle" / "00000.jpg"
    assert main([str(image), "--model", str(trained_run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "00000.json").read_text())
    assert record["grid_shape"] == [8, 8] and len(record["predictions"]) == 5  # the demo model: 64 px, patch 8


def test_cli_head_fusion_and_discard_ratio_reach_the_rollout(artifact_dir: Path, images: list[Path], tmp_path: Path) -> None:
    # The real CLI (in this process) with --head-fusion max --discard-ratio 0.5: its grid is the rollout computed
    # with those settings (the rollout itself is checked by hand above), not the default's.
    from vit_service.artifact import load_model
    from vit_service.explain import Explainer

    r = run_cli_in_process("vit-explain", str(images[0]), "--model", str(artifact_dir), "--head-fusion", "max",
                           "--discard-ratio", "0.5", "--out", str(tmp_path / "max"))
    assert r.returncode == 0, r.stderr
    default = run_cli_in_process("vit-explain", str(images[0]), "--model", str(artifact_dir),
                                 "--out", str(tmp_path / "mean"))
    assert default.returncode == 0, default.stderr
    grid = np.load(tmp_path / "max" / f"{images[0].stem}.npy")
    record = json.loads((tmp_path / "max" / f"{images[0].stem}.json").read_text())
    assert (record["head_fusion"], record["discard_ratio"]) == ("max", 0.5)
    explainer = Explainer(*load_model(artifact_dir))
    with Image.open(images[0]) as img:
        rgb = img.convert("RGB")
    expected = {(f, d): explainer.explain_image(rgb, "rollout", None, f, d).grid
                for f, d in (("max", 0.5), ("mean", 0.0))}
    assert np.allclose(grid, expected[("max", 0.5)], atol=1e-5)
    assert np.abs(expected[("max", 0.5)] - expected[("mean", 0.0)]).max() > 0.05  # the flags change the map
    assert np.allclose(np.load(tmp_path / "mean" / f"{images[0].stem}.npy"), expected[("mean", 0.0)], atol=1e-5)


def test_rollout_of_bf16_maps_equals_float32() -> None:
    """A model run in bf16 hands over bf16 attention maps; the rollout computes in float32 either way."""
    torch.manual_seed(0)
    maps = [torch.rand(2, 3, 5, 5).softmax(-1) for _ in range(3)]
    expected = attention_rollout(maps, 1)
    low = attention_rollout([m.to(torch.bfloat16) for m in maps], 1)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, expected, rtol=0, atol=2e-2)


def test_discard_weakest_zeroes_the_lowest_off_diagonal_entries_per_map() -> None:
    from vit_service.explain import _discard_weakest

    a = torch.tensor([[[0.05, 0.2, 0.3], [0.4, 0.01, 0.6], [0.7, 0.8, 0.02]],
                      [[0.9, 0.1, 0.5], [0.15, 0.9, 0.35], [0.25, 0.45, 0.9]]])  # (B=2, 3, 3)
    out = _discard_weakest(a, 1 / 3)  # k = int(9 / 3) = 3 entries per map
    expected = a.clone()
    expected[0, 0, 1] = expected[0, 0, 2] = expected[0, 1, 0] = 0.0  # 0.2, 0.3, 0.4 (the diagonal is kept)
    expected[1, 0, 1] = expected[1, 1, 0] = expected[1, 2, 0] = 0.0  # 0.1, 0.15, 0.25
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(_discard_weakest(a, 0.1), a, rtol=0, atol=0)  # int(0.9) = 0: nothing discarded
    one = _discard_weakest(a, 0.12)  # int(1.08) = 1: only the lowest
    assert (one == 0).sum().item() == 2 and one[0, 0, 1] == 0 and one[1, 0, 1] == 0


def test_rollout_defaults_read_the_class_token_and_check_the_ratio() -> None:
    torch.manual_seed(1)
    maps = [torch.rand(1, 2, 5, 5).softmax(-1) for _ in range(2)]
    grads = [torch.randn(1, 2, 5, 5) for _ in range(2)]
    torch.testing.assert_close(attention_rollout(maps, 1), attention_rollout(maps, 1, "token"))
    assert not torch.allclose(attention_rollout(maps, 1), attention_rollout(maps, 1, "avg"))
    torch.testing.assert_close(gradient_rollout(maps, grads, 1), gradient_rollout(maps, grads, 1, "token"))
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^discard_ratio must be in \[0, 1\), got {bad}$"):
            attention_rollout(maps, 1, discard_ratio=bad)
    with pytest.raises(ValueError, match=r"^head_fusion must be one of mean, max, min; got 'median'$"):
        attention_rollout(maps, 1, head_fusion="median")


def test_gradient_rollout_by_hand_for_one_layer() -> None:
    attn = torch.tensor([[[[0.6, 0.4], [0.3, 0.7]]]])  # (B=1, h=1, N=2, N)
    grad = torch.tensor([[[[1.0, -2.0], [0.5, 2.0]]]])
    # relevance = I + clamp(grad * attn, 0) @ I = [[1.6, 0], [0.15, 2.4]]; the class token's row, patch part
    torch.testing.assert_close(gradient_rollout([attn], [grad], 1), torch.tensor([[0.0]]))
    torch.testing.assert_close(gradient_rollout([attn], [grad], 0, "avg"), torch.tensor([[(1.6 + 0.15) / 2, 2.4 / 2]]))


def test_explainer_defaults_class_choice_temperature_and_dtypes() -> None:
    import dataclasses

    from tests.service_fixtures import build_tiny_model

    model, artifact = build_tiny_model()
    hot = dataclasses.replace(artifact, calibration={"temperature": 2.0})
    explainer, raw = Explainer(model, hot), Explainer(model, hot, calibrated=False)
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    default = explainer.explain_image(image)
    explicit = explainer.explain_image(image, "rollout", None, "mean", 0.0)
    np.testing.assert_array_equal(default.grid, explicit.grid)
    np.testing.assert_array_equal(default.probs, explicit.probs)
    assert default.method == "rollout" and default.grid.dtype == np.float32 and default.probs.dtype == np.float32
    assert default.class_index == int(np.argmax(default.probs))
    assert not np.array_equal(explainer.explain_image(image, discard_ratio=0.5).grid, default.grid)
    other = (default.class_index + 1) % len(artifact.class_names)
    chosen = explainer.explain_image(image, "grad", class_index=other)
    assert chosen.class_index == other and chosen.method == "grad"
    pixels = artifact.preprocessing.to_uint8(image)[None]
    probs, target, maps = explainer.explain_uint8(pixels)
    _, _, maps_fused = explainer.explain_uint8(pixels, "rollout", None, "max", 0.0)
    assert maps.dtype == np.float32 and maps.shape == default.grid[None].shape and not np.array_equal(maps, maps_fused)
    assert int(target[0]) == default.class_index
    raw_probs, _, _ = raw.explain_uint8(pixels)
    logits_t2 = np.log(probs[0])  # softmax(z / 2): its log differs from log softmax(z) / 2 by a constant
    np.testing.assert_allclose(np.log(raw_probs[0]) / 2 - logits_t2, (np.log(raw_probs[0]) / 2 - logits_t2)[0], atol=1e-4)
    assert not np.allclose(probs, raw_probs)


def test_class_index_accepts_names_and_indices_in_range() -> None:
    from tests.service_fixtures import build_tiny_model

    model, artifact = build_tiny_model()
    explainer = Explainer(model, artifact)
    names, last = artifact.class_names, len(artifact.class_names) - 1
    assert explainer.class_index(None) is None
    assert explainer.class_index(0) == 0 and explainer.class_index(last) == last
    assert explainer.class_index(names[1]) == 1
    for bad in (last + 1, -1):
        with pytest.raises(ValueError, match=rf"^class index {bad} out of range 0\.\.{last}$"):
            explainer.class_index(bad)
    with pytest.raises(ValueError, match=r"^unknown class 'nope'; the model's classes are: "):
        explainer.class_index("nope")


def test_attention_rollout_by_hand_over_two_blocks() -> None:
    """Abnar & Zuidema's recipe written out in numpy: per block 0.5 A + 0.5 I, rows to sum 1, multiplied in order."""
    torch.manual_seed(2)
    maps = [torch.rand(2, 3, 5, 5).softmax(-1) * torch.rand(2, 3, 5, 1) for _ in range(2)]  # rows not summing to 1
    rollout = np.broadcast_to(np.eye(5), (2, 5, 5))
    for attn in maps:
        a = 0.5 * attn.mean(dim=1).numpy() + 0.5 * np.eye(5)
        a = a / a.sum(axis=-1, keepdims=True)
        rollout = a @ rollout
    np.testing.assert_allclose(attention_rollout(maps, 1).numpy(), rollout[:, 0, 1:], rtol=1e-5)
    np.testing.assert_allclose(attention_rollout(maps, 1, "avg").numpy(), rollout[:, 1:, 1:].mean(axis=1), rtol=1e-5)


def test_normalize_map_scales_each_sample_alone_and_calls_flat_maps_flat() -> None:
    rel = torch.tensor([[0.0, 1.0, 2.0, 4.0], [10.0, 30.0, 20.0, 10.0]])
    torch.testing.assert_close(normalize_map(rel), torch.tensor([[0.0, 0.25, 0.5, 1.0], [0.0, 1.0, 0.5, 0.0]]))
    # flat: all zeros (a zero span at a zero peak), and a span within float rounding of a large value
    flat = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 100.0001, 100.0, 100.0]])
    torch.testing.assert_close(normalize_map(flat), torch.ones_like(flat))
    # the flatness threshold is each sample's own: a tiny-valued map beside a large flat one keeps its shape
    mixed = torch.tensor([[1000.0, 1000.001, 1000.0, 1000.0], [0.0, 1e-4, 5e-5, 0.0]])
    torch.testing.assert_close(normalize_map(mixed), torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.5, 0.0]]))


def test_explain_batch_defaults_targets_and_pooling(model: VisionTransformer) -> None:
    x = torch.randn(2, 3, 32, 32)
    probs, target, maps = explain_batch(model, x)  # rollout, the top class, temperature 1
    rollout = explain_batch(model, x, "rollout", None, "mean", 0.0, 1.0)
    for got, expected in zip((probs, target, maps), rollout):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(probs, model(x).softmax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(explain_batch(model, x, temperature=2.0)[0], (model(x) / 2).softmax(-1),
                               rtol=1e-5, atol=1e-6)
    asked = next(c for c in range(3) if c not in target.tolist())  # a class neither image has on top
    for method in ("rollout", "grad"):
        _, chosen, _ = explain_batch(model, x, method, class_index=asked)
        assert chosen.dtype == torch.long and chosen.tolist() == [asked, asked]  # the asked class, not the top one
    with pytest.raises(ValueError, match=r"^method must be one of rollout, grad; got 'lrp'$"):
        explain_batch(model, x, "lrp")  # type: ignore[arg-type]
    # the map reads the pooled head input: the class token for this model, the patch rows for an avg-pool one
    _, attentions = model.attention_maps(x)
    torch.testing.assert_close(maps, normalize_map(attention_rollout(attentions, 1, "token")).view(2, 4, 4))
    with torch.enable_grad():
        logits, attentions = model.forward_with_attention(x)
        grads = torch.autograd.grad(logits.gather(1, logits.argmax(-1)[:, None]).sum(), attentions)
    expected = normalize_map(gradient_rollout([a.detach() for a in attentions], list(grads), 1, "token")).view(2, 4, 4)
    torch.testing.assert_close(explain_batch(model, x, "grad")[2], expected)
    torch.manual_seed(0)
    avg = VisionTransformer(ViTConfig(image_size=32, patch_size=8, num_classes=3, embed_dim=48, depth=2, num_heads=3,
                                      global_pool="avg")).eval()
    with torch.no_grad():
        for p in avg.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x.requires_grad_(False)
    with torch.enable_grad():
        logits, attentions = avg.forward_with_attention(x)
        grads = torch.autograd.grad(logits.gather(1, logits.argmax(-1)[:, None]).sum(), attentions)
    expected = normalize_map(gradient_rollout([a.detach() for a in attentions], list(grads), 1, "avg")).view(2, 4, 4)
    torch.testing.assert_close(explain_batch(avg, x, "grad")[2], expected)
    assert not torch.allclose(expected, normalize_map(gradient_rollout([a.detach() for a in attentions], list(grads), 1,
                                                                       "token")).view(2, 4, 4))


def test_explain_batch_explains_the_asked_class_of_a_one_class_model() -> None:
    torch.manual_seed(0)
    single = VisionTransformer(ViTConfig(image_size=16, patch_size=8, num_classes=1, embed_dim=24, depth=1,
                                         num_heads=2)).eval()
    for method in ("rollout", "grad"):
        probs, target, maps = explain_batch(single, torch.randn(2, 3, 16, 16), method, class_index=0)
        assert target.tolist() == [0, 0] and probs.shape == (2, 1) and maps.shape == (2, 2, 2)
