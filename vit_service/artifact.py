"""The exported model: the one thing serving needs.

A model directory (a BentoML model store entry, or any folder) holds
    model.safetensors   the VisionTransformer state dict (timm parameter names)
    vit_artifact.json   {"format_version", "model_config", "class_names", "preprocessing", "metadata",
                         "int8" (only with vit-export --int8), "calibration", "reference"}
so the service never re-declares the architecture, the labels or the preprocessing. "int8" records
the int8 model beside it (model.int8.onnx, vit_service/quantize.py) and how it was measured against
fp32: {"file", "method", "weights", "images", "labelled", "agreement_top1", "fp32_top1",
"int8_top1", "max_prob_diff", "measured_on", ...}; serving reads the agreement as its guard. "calibration" is the
temperature fitted at export and its figures (vit_service/calibration.py): {"temperature", "images",
"source", "nll_before", "nll_after", "ece_before", "ece_after", "bins", "int8": {"ece_before",
"ece_after"}}; every predictor divides the logits by it. "reference" is what the served scores looked
like on the export's images (calibration.reference_record). A model exported before either has None.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vit_service.model import ViTConfig, VisionTransformer
from vit_service.preprocessing import Preprocessing

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "vit_artifact.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A model directory is missing files or holds an inconsistent manifest."""



def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """safetensors' save_file, with the permissions of any other file written here: it creates the
    file 0600 (a private temporary file, renamed), so the weights were unreadable to others while
    vit_artifact.json beside them followed the umask (0644)."""
    save_file(state, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)

@dataclass
class ModelArtifact:
    config: ViTConfig
    class_names: list[str]
    preprocessing: Preprocessing
    metadata: dict[str, Any] = field(default_factory=dict)
    int8: dict[str, Any] | None = None  # the int8 model's record (vit-export --int8), or None
    calibration: dict[str, Any] | None = None  # the fitted temperature and its figures, or None
    reference: dict[str, Any] | None = None  # the served scores' shape on the export's images, or None

    def __post_init__(self) -> None:
        if len(self.class_names) != self.config.num_classes:
            raise ArtifactError(
                f"{len(self.class_names)} class names for a model with {self.config.num_classes} classes"
            )
        if self.preprocessing.image_size % self.config.patch_size:
            raise ArtifactError(
                f"preprocessing image_size {self.preprocessing.image_size} is not a multiple of "
                f"patch size {self.config.patch_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "metadata": self.metadata,
            **({"int8": self.int8} if self.int8 else {}),
            **({"calibration": self.calibration} if self.calibration else {}),
            **({"reference": self.reference} if self.reference else {}),
        }

    @property
    def temperature(self) -> float:
        """The temperature the logits are divided by before the softmax: 1.0 without calibration."""
        return float(self.calibration["temperature"]) if self.calibration else 1.0

    def save(self, model: VisionTransformer, directory: str | os.PathLike[str]) -> Path:
        """Writes the weights and manifest into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_safetensors(state, directory / WEIGHTS_FILE)
        (directory / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return directory

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> ModelArtifact:
        directory = Path(directory)
        manifest = directory / MANIFEST_FILE
        if not manifest.is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise ArtifactError(f"{directory} is not a vit-service model: expected {MANIFEST_FILE} and {WEIGHTS_FILE}")
        try:
            d = json.loads(manifest.read_text())
            if d.get("format_version") != FORMAT_VERSION:
                raise ArtifactError(f"{manifest}: unsupported format_version {d.get('format_version')!r}")
            return cls(
                config=ViTConfig.from_dict(d["model_config"]),
                class_names=list(d["class_names"]),
                preprocessing=Preprocessing.from_dict(d["preprocessing"]),
                metadata=d.get("metadata", {}),
                int8=_int8_record(d.get("int8"), manifest),
                calibration=_calibration_record(d.get("calibration"), manifest),
                reference=d.get("reference"),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{manifest}: malformed manifest ({e})") from None


def _int8_record(record: Any, manifest: Path) -> dict[str, Any] | None:
    if record is None:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("file"), str):
        raise ArtifactError(f"{manifest}: malformed int8 record (expected an object with a \"file\")")
    if not (manifest.parent / record["file"]).is_file():
        raise ArtifactError(f"{manifest}: records an int8 model {record['file']} that is not in {manifest.parent}")
    return record


def _calibration_record(record: Any, manifest: Path) -> dict[str, Any] | None:
    if record is None:
        return None
    t = record.get("temperature") if isinstance(record, dict) else None
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0:
        raise ArtifactError(f"{manifest}: malformed calibration record (expected a positive \"temperature\")")
    return record


def is_artifact_dir(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def check_weights(directory: str | os.PathLike[str]) -> None:
    """Raises ArtifactError unless model.safetensors holds exactly the tensors (names and shapes)
    the artifact's config builds. Reads the file's header only: no weights are loaded."""
    from safetensors import safe_open

    artifact = ModelArtifact.read(directory)
    with torch.device("meta"):  # shapes without memory
        expected = {k: tuple(v.shape) for k, v in VisionTransformer(artifact.config).state_dict().items()}
    path = Path(directory) / WEIGHTS_FILE
    try:
        with safe_open(str(path), "pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors' own errors for a damaged header
        raise ArtifactError(f"{path}: unreadable weights ({type(e).__name__}: {e})") from None
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    if missing or unexpected or reshaped:
        problems = [f"{name} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("other shapes", reshaped)) if keys]
        raise ArtifactError(f"{path} does not match the model its {MANIFEST_FILE} describes: {'; '.join(problems)}")


def load_model(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[VisionTransformer, ModelArtifact]:
    """Builds the exported model in eval mode on `device`, with its artifact description."""
    artifact = ModelArtifact.read(directory)
    with torch.device("meta"):  # no random draw for weights replaced next
        model = VisionTransformer(artifact.config)
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)), strict=True, assign=True)
    return model.float().to(device).eval(), artifact  # float(): fp32 as built, whatever the file held
