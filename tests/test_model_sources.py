"""One loader for any model source; checkpoints carry their resolved ViTConfig.

A run fine-tuned from a model whose architecture is not its config's `preset` (here a local
transformers folder standing in for a hub model, which is then gone, as the hub cache is on
another machine) must come back with the architecture it trained, through vit-explain's loader
and through vit-export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import demo_config, run_cli_in_process
from training.run_checkpoints import MODEL_FORMATS
from vit_service.artifact import ModelArtifact, load_model
from vit_service.formats.sources import CHECKPOINT_CONFIG_KEY, ModelSourceError, load_model_source
from vit_service.formats.transformers_vit import save_transformers_folder
from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import Preprocessing

# Not the demo preset (vit_demo_patch8_64: width 96, depth 4, avg pooling): width 48, depth 2, class token.
INIT_ARCH = dict(embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def finetuned_run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetuned")
    init = root / "init_model"
    config = ViTConfig(image_size=64, patch_size=8, num_classes=6, **INIT_ARCH)
    classes = sorted(p.name for p in (demo_data / "train").iterdir())
    save_transformers_folder(VisionTransformer(config), ModelArtifact(config, classes, Preprocessing(64, 1.0)), init)
    result = run_cli_in_process("vit-train", "fit", "--config", str(demo_config(root, demo_data, max_epochs=1)),
                                "--model.init_from", str(init), "--trainer.limit_train_batches", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    for f in init.iterdir():  # the init model is gone: readers must not need it
        f.unlink()
    init.rmdir()
    return root / "version_0"


def _arch(config: ViTConfig) -> tuple:
    return (config.embed_dim, config.depth, config.num_heads, config.mlp_ratio, config.global_pool)


def test_checkpoint_carries_the_resolved_config(finetuned_run: Path) -> None:
    ckpt = torch.load(finetuned_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["preset"] == "vit_demo_patch8_64"
    assert _arch(ViTConfig.from_dict(ckpt[CHECKPOINT_CONFIG_KEY])) == (48, 2, 3, 2.0, "token")


@pytest.mark.parametrize("which", ["run", "ckpt"])
def test_explain_loader_builds_the_trained_architecture(finetuned_run: Path, which: str) -> None:
    source = finetuned_run if which == "run" else finetuned_run / "checkpoints/last.ckpt"
    model, artifact = load_model_source(str(source), formats=MODEL_FORMATS)  # vit-explain's list: run folders too
    assert _arch(model.config) == _arch(artifact.config) == (48, 2, 3, 2.0, "token")
    assert artifact.class_names and artifact.preprocessing.image_size == 64


def test_export_builds_the_trained_architecture(finetuned_run: Path, tmp_path: Path) -> None:
    ckpt = finetuned_run / "checkpoints/last.ckpt"
    result = run_cli_in_process("vit-export", "--ckpt", str(ckpt), "--dir", str(tmp_path / "out"),
                     env={"BENTOML_HOME": str(tmp_path / "bentoml")})
    assert result.returncode == 0, result.stderr[-3000:]
    exported, artifact = load_model(tmp_path / "out")
    assert _arch(artifact.config) == (48, 2, 3, 2.0, "token")
    loaded, _ = load_model_source(str(ckpt))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(exported(x), loaded(x))  # the trained weights, not just the shapes


def test_old_checkpoint_without_config_falls_back_to_its_hyper_parameters(finetuned_run: Path,
                                                                          tmp_path: Path) -> None:
    ckpt = torch.load(finetuned_run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    del ckpt[CHECKPOINT_CONFIG_KEY]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    # Its init_from folder is gone, so the preset is all there is: the wrong architecture, said clearly.
    with pytest.raises(ModelSourceError, match="old.ckpt"):
        load_model_source(str(old))
    # A checkpoint whose hyper-parameters spell the architecture out loads as before.
    ckpt["hyper_parameters"].update(init_from=None, model_overrides={**INIT_ARCH, "global_pool": "token"})
    torch.save(ckpt, old)
    model, _ = load_model_source(str(old))
    assert _arch(model.config) == (48, 2, 3, 2.0, "token")


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.ckpt", "missing.ckpt: no such checkpoint file or model folder"),
    (lambda d: d, "a folder with no model in it"),
    (lambda d: (d / "x.ckpt").write_bytes(b"garbage") and d / "x.ckpt", "x.ckpt: not a readable checkpoint"),
])
def test_bad_sources_are_one_clear_error(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(ModelSourceError, match=message):
        load_model_source(str(make(tmp_path)))
    result = run_cli_in_process("vit-explain", str(Path(__file__)), "--model", str(make(tmp_path)),
                                "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
