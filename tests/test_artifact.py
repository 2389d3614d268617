"""The exported model folder itself (vit_service/artifact.py): what `save` writes, what `read` gives back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.service_fixtures import build_tiny_model
from vit_service.artifact import (MANIFEST_FILE, WEIGHTS_FILE, ArtifactError, ModelArtifact, check_weights,
                                  is_artifact_dir, load_model, save_safetensors)
from vit_service.preprocessing import Preprocessing


def test_save_creates_missing_parents_and_replaces_an_earlier_save(tmp_path: Path) -> None:
    model, artifact = build_tiny_model()
    folder = tmp_path / "models" / "tiny" / "v1"  # no part of it exists yet
    assert artifact.save(model, folder) == folder
    artifact.metadata = {**artifact.metadata, "epochs": 3}
    artifact.save(model, folder)  # the same folder again: replaced, not an error
    assert json.loads((folder / MANIFEST_FILE).read_text())["metadata"]["epochs"] == 3
    loaded, read = load_model(folder)
    assert read.metadata == artifact.metadata
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_optional_records_are_written_only_when_present(tmp_path: Path) -> None:
    model, artifact = build_tiny_model()
    assert set(artifact.to_dict()) == {"format_version", "model_config", "class_names", "preprocessing", "metadata"}
    (tmp_path / "model.int8.onnx").write_bytes(b"onnx")
    artifact.int8 = {"file": "model.int8.onnx", "agreement_top1": 0.995}
    artifact.calibration = {"temperature": 1.5}
    artifact.reference = {"images": 10}
    artifact.save(model, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["int8"] == artifact.int8 and manifest["calibration"] == {"temperature": 1.5}
    assert manifest["reference"] == {"images": 10}
    read = ModelArtifact.read(tmp_path)
    assert (read.int8, read.calibration, read.reference, read.temperature) == (
        artifact.int8, artifact.calibration, artifact.reference, 1.5)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weights_follow_the_umask_and_carry_the_pt_format(tmp_path: Path, umask: int) -> None:
    """transformers refuses a safetensors file without metadata format "pt"; the file's mode is any other file's."""
    old = os.umask(umask)
    try:
        save_safetensors({"w": torch.ones(2)}, tmp_path / WEIGHTS_FILE)
        (tmp_path / "other").write_text("x")
    finally:
        os.umask(old)
    mode = os.stat(tmp_path / WEIGHTS_FILE).st_mode & 0o777
    assert mode == 0o666 & ~umask == os.stat(tmp_path / "other").st_mode & 0o777
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_a_model_folder_needs_both_files(tmp_path: Path) -> None:
    model, artifact = build_tiny_model()
    artifact.save(model, tmp_path / "full")
    assert is_artifact_dir(tmp_path / "full")
    for keep in (MANIFEST_FILE, WEIGHTS_FILE):
        half = tmp_path / f"only_{keep}"
        half.mkdir()
        (half / keep).write_bytes((tmp_path / "full" / keep).read_bytes())
        assert not is_artifact_dir(half), keep
    assert not is_artifact_dir(tmp_path / "full" / WEIGHTS_FILE)  # a file, not a folder


def test_read_names_what_is_wrong_with_a_folder(tmp_path: Path) -> None:
    model, artifact = build_tiny_model()
    artifact.save(model, tmp_path / "full")
    for keep in (MANIFEST_FILE, WEIGHTS_FILE):
        half = tmp_path / f"only_{keep}"
        half.mkdir()
        (half / keep).write_bytes((tmp_path / "full" / keep).read_bytes())
        with pytest.raises(ArtifactError, match=rf"^{half} is not a vit-service model: expected {MANIFEST_FILE} and "
                                                rf"{WEIGHTS_FILE}$"):
            ModelArtifact.read(half)
    manifest = tmp_path / "full" / MANIFEST_FILE
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 7}))
    with pytest.raises(ArtifactError, match=rf"^{manifest}: unsupported format_version 7$"):
        ModelArtifact.read(tmp_path / "full")


def test_metadata_values_json_cannot_hold_are_written_as_text(tmp_path: Path) -> None:
    model, artifact = build_tiny_model()
    artifact.metadata = {"data_dir": tmp_path / "images", "epochs": 2}
    artifact.save(model, tmp_path / "model")
    assert ModelArtifact.read(tmp_path / "model").metadata == {"data_dir": str(tmp_path / "images"), "epochs": 2}


def _saved(tmp_path: Path, **records: object) -> Path:
    model, artifact = build_tiny_model()
    folder = tmp_path / "model"
    artifact.save(model, folder)
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **records}))
    return folder


_NO_TEMPERATURE = r'malformed calibration record \(expected a positive "temperature"\)'
_NO_FILE = r'malformed int8 record \(expected an object with a "file"\)'


@pytest.mark.parametrize("key,record,problem", [
    *[("calibration", record, _NO_TEMPERATURE) for record in (
        {"temperature": 0}, {"temperature": -1.0}, {"temperature": True}, {"temperature": "1.5"}, {"nll_after": 0.3},
        [1.5], 1.5)],
    *[("int8", record, _NO_FILE) for record in ("model.int8.onnx", {"agreement_top1": 1.0}, {"file": 3})],
])
def test_a_malformed_record_is_named(tmp_path: Path, key: str, record: object, problem: str) -> None:
    folder = _saved(tmp_path, **{key: record})
    with pytest.raises(ArtifactError, match=rf"^{folder / MANIFEST_FILE}: {problem}$"):
        ModelArtifact.read(folder)


def test_a_small_temperature_is_a_temperature(tmp_path: Path) -> None:
    assert ModelArtifact.read(_saved(tmp_path, calibration={"temperature": 0.5})).temperature == 0.5


def test_an_int8_record_needs_its_file_beside_the_manifest(tmp_path: Path) -> None:
    folder = _saved(tmp_path, int8={"file": "model.int8.onnx"})
    with pytest.raises(ArtifactError, match=rf"^{folder / MANIFEST_FILE}: records an int8 model model.int8.onnx "
                                            rf"that is not in {folder}$"):
        ModelArtifact.read(folder)
    (folder / "model.int8.onnx").write_bytes(b"onnx")
    assert ModelArtifact.read(folder).int8 == {"file": "model.int8.onnx"}


def test_a_manifest_without_metadata_reads_as_empty_and_a_broken_one_is_named(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    manifest = folder / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    del data["metadata"]
    manifest.write_text(json.dumps(data))
    assert ModelArtifact.read(folder).metadata == {}
    del data["class_names"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=rf"^{manifest}: malformed manifest \('class_names'\)$"):
        ModelArtifact.read(folder)


def test_the_artifact_refuses_names_and_sizes_its_model_cannot_have() -> None:
    model, artifact = build_tiny_model()
    with pytest.raises(ArtifactError, match=r"^3 class names for a model with 4 classes$"):
        ModelArtifact(artifact.config, artifact.class_names[:3], artifact.preprocessing)
    with pytest.raises(ArtifactError, match=r"^preprocessing image_size 36 is not a multiple of patch size 8$"):
        ModelArtifact(artifact.config, artifact.class_names, Preprocessing(image_size=36))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS_FILE))


def test_check_weights_names_missing_unexpected_and_reshaped_tensors(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    check_weights(folder)  # as saved: no error
    weights = _weights(folder)
    path = folder / WEIGHTS_FILE
    cases = [
        ({k: v for k, v in weights.items() if k != "head.bias"}, r"missing \['head.bias'\]"),
        ({**weights, "extra.a": torch.ones(1)}, r"unexpected \['extra.a'\]"),
        ({**weights, "head.bias": torch.ones(5)}, r"other shapes \['head.bias'\]"),
        ({**{k: v for k, v in weights.items() if not k.startswith("blocks.1.")}, "extra.a": torch.ones(1)},
         r"missing \['blocks.1.attn.proj.bias', 'blocks.1.attn.proj.weight', 'blocks.1.attn.qkv.bias'\] \.\.\.; "
         r"unexpected \['extra.a'\]"),
        ({k: v for k, v in weights.items() if k not in ("cls_token", "pos_embed", "norm.bias")},
         r"missing \['cls_token', 'norm.bias', 'pos_embed'\]"),  # three: all named
        ({k: v for k, v in weights.items() if k not in ("cls_token", "pos_embed", "norm.bias", "norm.weight")},
         r"missing \['cls_token', 'norm.bias', 'norm.weight'\] \.\.\."),  # four: three named
    ]
    for state, problems in cases:
        save_safetensors(state, path)
        with pytest.raises(ArtifactError, match=rf"^{path} does not match the model its {MANIFEST_FILE} describes: "
                                                rf"{problems}$"):
            check_weights(folder)
    path.write_bytes(b"not safetensors at all")
    with pytest.raises(ArtifactError, match=rf"^{path}: unreadable weights \(SafetensorError: "):
        check_weights(folder)


def test_load_model_refuses_weights_that_do_not_fill_the_model(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    save_safetensors({k: v for k, v in _weights(folder).items() if k != "head.bias"}, folder / WEIGHTS_FILE)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model(folder)


def test_load_model_gives_the_files_weights_in_fp32_with_gradients_on(tmp_path: Path) -> None:
    """load_model builds the model on the meta device and assigns the file's tensors to it: the
    model holds exactly those values, as fp32 parameters that train (a file saved in bf16 too)."""
    folder = _saved(tmp_path)
    saved = _weights(folder)
    save_safetensors({k: v.to(torch.bfloat16) for k, v in saved.items()}, folder / WEIGHTS_FILE)
    model, _ = load_model(folder)
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for name, value in state.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu", name
        assert torch.equal(value, saved[name].to(torch.bfloat16).float()), name
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_a_cpu_build_draws_timms_init() -> None:
    """Only a meta build skips the random draw (tests/test_service.py: a served model's start): one
    on the CPU is initialised as timm's, trunc-normal(0.02) pos_embed and Linear weights, zero biases."""
    model, _ = build_tiny_model()
    torch.manual_seed(0)
    fresh = type(model)(model.config)
    assert 0.01 < fresh.pos_embed.std().item() < 0.03
    assert 0 < fresh.cls_token.abs().max().item() < 1e-5
    assert 0.01 < fresh.head.weight.std().item() < 0.03 and not fresh.head.bias.any()
