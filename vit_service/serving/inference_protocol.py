"""The Open Inference Protocol (KServe v2), REST: what Triton, KServe, OpenVINO Model Server and
TorchServe speak, so `tritonclient`, `perf_analyzer` and KServe work with this service unchanged.

    GET  /v2                                      server metadata
    GET  /v2/health/live, /v2/health/ready        200 when live / ready (probes: open without a key)
    GET  /v2/models/{name}[/versions/{version}]   model metadata
    GET  /v2/models/{name}[/versions/{version}]/ready     200 when the model is ready
    POST /v2/models/{name}[/versions/{version}]/infer     inference

`name` is the model's name in the BentoML store (e.g. vit-classifier), `version` its version.
Inputs, one of: "image" BYTES [N] or [N, 1] (encoded image files, the form Triton's image clients
send) or "pixels" UINT8 [N, 3, S, S] (resized and cropped, not normalised). Outputs:
"probabilities" FP32 [N, K] (every class's score) and "labels" BYTES [N, k] (the top-k class
names; k from the request parameter "top_k", default 5). Tensors travel as JSON or, in both
directions, in Triton's binary tensor data extension (what tritonclient sends by default).
Errors are `{"error": "<message>"}`, 400 for a bad request, 404 for an unknown model or version.
The requests go through the same batcher, limits, API keys and metrics as /classify.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import bentoml
import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

import vit_service
from vit_service.serving import metrics
from vit_service.serving.errors import RequestError, error_response
from vit_service.serving.http import UploadedFile
from vit_service.serving.validation import top_k_or_default

HEADER = "inference-header-content-length"  # the binary extension: the JSON's length, the tensors after it
IMAGE, PIXELS, PROBABILITIES, LABELS = "image", "pixels", "probabilities", "labels"
NUMPY = {"UINT8": np.uint8, "FP32": np.float32}
router = APIRouter()


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: Any  # list[bytes] for BYTES, else a numpy array
    binary: bool = False  # answered in the binary extension

    def to_json(self) -> tuple[dict[str, Any], bytes]:
        """(its JSON entry, its binary bytes or b"")."""
        entry: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": self.shape}
        if not self.binary:
            values = [v.decode() for v in self.data] if self.datatype == "BYTES" else self.data.ravel().tolist()
            return {**entry, "data": values}, b""
        raw = (b"".join(struct.pack("<I", len(v)) + v for v in self.data) if self.datatype == "BYTES"
               else np.ascontiguousarray(self.data, NUMPY[self.datatype]).tobytes())
        return {**entry, "parameters": {"binary_data_size": len(raw)}}, raw


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, Tensor]
    outputs: dict[str, bool] = field(default_factory=dict)  # requested name -> binary; empty: all
    all_binary: bool = False
    top_k: int | None = None


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The request body (JSON, or JSON + binary tensors) -> InferRequest; RequestError(400) on a mistake."""
    try:
        size = int(header_length) if header_length is not None else len(body)
        if not 0 <= size <= len(body):
            raise ValueError(size)
        head = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the inference request is not valid JSON (or its Inference-Header-Content-Length "
                                "is wrong)", "bad_infer_request") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list) or not head["inputs"]:
        raise RequestError(400, "an inference request needs \"inputs\": a list of tensors", "bad_infer_request")
    binary, inputs = memoryview(body)[size:], {}
    for spec in head["inputs"]:
        tensor, used = _input_tensor(spec, binary)
        binary = binary[used:]
        inputs[tensor.name] = tensor
    parameters = _parameters(head, "the request")
    outputs = {}
    if not isinstance(head.get("outputs") or [], list):
        raise RequestError(400, "\"outputs\" must be a list of the outputs wanted", "bad_infer_request")
    for spec in head.get("outputs") or []:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in (PROBABILITIES, LABELS):
            raise RequestError(400, f"unknown output {name!r}: the outputs are {PROBABILITIES!r} and {LABELS!r}",
                               "bad_infer_request")
        outputs[name] = bool(_parameters(spec, f"output {name!r}").get("binary_data", False))
    top_k = parameters.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
        raise RequestError(400, f"parameter \"top_k\" must be an integer, got {top_k!r}", "bad_top_k")
    return InferRequest(head.get("id"), inputs, outputs, bool(parameters.get("binary_data_output")), top_k)


def _parameters(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """The "parameters" object of the request or of one of its tensors ({} when absent)."""
    parameters = spec.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestError(400, f"\"parameters\" of {where} must be an object, got {parameters!r:.40}",
                           "bad_infer_request")
    return parameters


def _input_tensor(spec: Any, binary: memoryview) -> tuple[Tensor, int]:
    """One input's JSON entry (and its share of the binary part) -> (Tensor, binary bytes used)."""
    if not isinstance(spec, dict) or spec.get("name") not in (IMAGE, PIXELS):
        name = spec.get("name") if isinstance(spec, dict) else spec
        raise RequestError(400, f"unknown input {name!r}: send {IMAGE!r} (BYTES, encoded images) or {PIXELS!r} "
                                f"(UINT8 [N, 3, S, S])", "bad_infer_request")
    name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
    wanted = "BYTES" if name == IMAGE else "UINT8"
    if datatype != wanted:
        raise RequestError(400, f"input {name!r} must have datatype {wanted}, got {datatype!r}", "bad_datatype")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError(400, f"input {name!r}: \"shape\" must be a list of sizes, got {shape!r}", "bad_shape")
    count = math.prod(shape)
    size = _parameters(spec, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise RequestError(400, f"input {name!r}: binary_data_size {size!r} is not a byte count the request holds",
                               "bad_infer_request")
        raw, used = bytes(binary[:size]), size
        data: Any = _unpack_bytes(raw, name) if datatype == "BYTES" else np.frombuffer(raw, np.uint8)
    else:
        values, used = spec.get("data"), 0
        if not isinstance(values, list):
            raise RequestError(400, f"input {name!r} has neither \"data\" nor a binary_data_size", "bad_infer_request")
        values = list(_flatten(values))
        if datatype == "BYTES":
            if not all(isinstance(v, str) for v in values):
                raise RequestError(400, f"input {name!r}: BYTES data in JSON must be strings", "bad_infer_request")
            data = [v.encode("utf-8", "surrogateescape") for v in values]
        else:
            try:
                data = np.asarray(values, np.int64)
            except (TypeError, ValueError):
                raise RequestError(400, f"input {name!r}: UINT8 data must be integers", "bad_infer_request") from None
            if data.size and (data.min() < 0 or data.max() > 255):
                raise RequestError(400, f"input {name!r}: UINT8 data must be in 0..255", "bad_infer_request")
            data = data.astype(np.uint8)
    if len(data) != count:
        raise RequestError(400, f"input {name!r}: shape {shape} holds {count} elements but {len(data)} were sent",
                           "bad_shape")
    return Tensor(name, datatype, shape, data), used


def _flatten(values: list[Any]) -> Any:
    for v in values:
        if isinstance(v, list):
            yield from _flatten(v)
        else:
            yield v


def _unpack_bytes(raw: bytes, name: str) -> list[bytes]:
    """The binary extension's BYTES tensor: each element a 4-byte little-endian length, then its bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise RequestError(400, f"input {name!r}: a truncated BYTES element", "bad_infer_request")
        (length,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + length > len(raw):
            raise RequestError(400, f"input {name!r}: a truncated BYTES element", "bad_infer_request")
        out.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return out


def encode_infer_response(model: str, version: str, request_id: str | None, outputs: list[Tensor]) -> Response:
    """The inference answer: JSON, or JSON + binary tensors (with its header) where any was asked binary."""
    entries, blobs = zip(*(t.to_json() for t in outputs))
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": list(entries)}
    if request_id is not None:
        head["id"] = request_id
    header = json.dumps(head).encode()
    if not any(blobs):
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


# ------------------------------------------------------------------ the routes

def _model(service: Any, name: str, version: str | None) -> tuple[Any, str, str]:
    """(the model handle, its name, its version) if the request names the served model;
    RequestError(404) otherwise. One handle for the whole request, whatever moves meanwhile."""
    model = service.model
    served_name, served_version = str(model.tag).split(":")
    if name != served_name or (version not in (None, "", served_version)):
        asked = f"{name}" + (f" version {version}" if version else "")
        raise RequestError(404, f"unknown model {asked}: this server serves {served_name} version {served_version}",
                           "unknown_model")
    return model, served_name, served_version


def _answer(call: Any) -> Any:
    """Wraps a route: its RequestError as the protocol's {"error": ...} with the status."""
    @functools.wraps(call)  # FastAPI reads the parameters through it
    async def route(*args: Any, **kwargs: Any) -> Response:
        try:
            return await call(*args, **kwargs)
        except RequestError as e:
            if e.status < 500:
                metrics.rejected_uploads_total.labels(reason=e.reason).inc()
            return error_response(e.status, e.message)

    return route


@router.get("/v2", response_model=None)
async def server_metadata() -> Response:
    """Server metadata (Open Inference Protocol)."""
    return Response(json.dumps({"name": "vit-service", "version": vit_service.__version__,
                                "extensions": ["binary_tensor_data"]}), media_type="application/json")


@router.get("/v2/health/live", response_model=None)
async def server_live() -> Response:
    """200 while the server runs."""
    return Response(status_code=200)


@router.get("/v2/health/ready", response_model=None)
async def server_ready(service: Any = Depends(bentoml.get_current_service)) -> Response:
    """200 when the model is ready, else 503 (the protocol's 'not ready')."""
    return Response(status_code=200 if await service.model.ready() else 503)


@router.get("/v2/models/{name}", response_model=None)
@router.get("/v2/models/{name}/versions/{version}", response_model=None)
@_answer
async def model_metadata(name: str, version: str | None = None,
                         service: Any = Depends(bentoml.get_current_service)) -> Response:
    """Model metadata: its inputs and outputs (Open Inference Protocol)."""
    handle, model, served = _model(service, name, version)
    info = await handle.describe()
    S = info.preprocessing.image_size
    body = {"name": model, "versions": [served], "platform": "vit-service",
            "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
                       {"name": PIXELS, "datatype": "UINT8", "shape": [-1, 3, S, S]}],
            "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(info.class_names)]},
                        {"name": LABELS, "datatype": "BYTES", "shape": [-1, -1]}]}
    return Response(json.dumps(body), media_type="application/json")


@router.get("/v2/models/{name}/ready", response_model=None)
@router.get("/v2/models/{name}/versions/{version}/ready", response_model=None)
@_answer
async def model_ready(name: str, version: str | None = None,
                      service: Any = Depends(bentoml.get_current_service)) -> Response:
    """200 when this model (version) is ready, else 503."""
    handle, _, _ = _model(service, name, version)
    return Response(status_code=200 if await handle.ready() else 503)


@router.post("/v2/models/{name}/infer", response_model=None)
@router.post("/v2/models/{name}/versions/{version}/infer", response_model=None)
@_answer
async def infer(name: str, request: Request, version: str | None = None,
                service: Any = Depends(bentoml.get_current_service)) -> Response:
    """Inference (Open Inference Protocol): "image" BYTES or "pixels" UINT8 in; "probabilities"
    FP32 and "labels" BYTES out."""
    from vit_service.serving.settings import current_settings

    handle, model, served = _model(service, name, version)
    parsed = parse_infer_request(await request.body(), request.headers.get(HEADER))
    if len(parsed.inputs) != 1:
        raise RequestError(400, f"send one input, {IMAGE!r} or {PIXELS!r}; got {sorted(parsed.inputs)}",
                           "bad_infer_request")
    [tensor] = parsed.inputs.values()
    max_images = current_settings().max_images
    info = await handle.describe()
    if tensor.name == IMAGE:
        if len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise RequestError(400, f"input {IMAGE!r}: shape [N] or [N, 1] (one encoded image each), "
                                    f"got {tensor.shape}", "bad_shape")
        images = [UploadedFile(f"image #{i + 1}", data) for i, data in enumerate(tensor.data)]
        _check_count(len(images), max_images)
        batch = np.stack([pixels for _, pixels in await service.decode(images, info)])  # (N, 3, S, S)
    else:
        S = info.preprocessing.image_size
        if tensor.shape[1:] != [3, S, S]:
            raise RequestError(400, f"input {PIXELS!r}: shape [N, 3, {S}, {S}], got {tensor.shape}", "bad_shape")
        _check_count(tensor.shape[0], max_images)
        batch = tensor.data.reshape(tensor.shape)  # (N, 3, S, S)
    k = top_k_or_default(parsed.top_k, info.class_names)
    probs = await handle.predict(batch, {})  # (N, K)
    metrics.images_total.labels(endpoint="infer", outcome="ok").inc(len(batch))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
    wanted = parsed.outputs or {PROBABILITIES: parsed.all_binary, LABELS: parsed.all_binary}
    tensors = {PROBABILITIES: Tensor(PROBABILITIES, "FP32", list(probs.shape), probs.astype(np.float32)),
               LABELS: Tensor(LABELS, "BYTES", [len(batch), k],
                              [info.class_names[i].encode() for row in top for i in row])}
    out = []
    for name_ in (PROBABILITIES, LABELS):
        if name_ in wanted:
            tensors[name_].binary = wanted[name_] or parsed.all_binary
            out.append(tensors[name_])
    return encode_infer_response(model, served, parsed.id, out)


def _check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise RequestError(400, "no images given", "missing_field")
    if n > max_images:
        raise RequestError(413, f"too many images: {n} in one request, the limit is {max_images}", "too_many_images")
