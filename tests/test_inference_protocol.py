"""The Open Inference Protocol (serving/inference_protocol.py) through a real `bentoml serve`, with
tritonclient, the protocol's reference client, as the oracle: metadata, health, infer in binary and
JSON form, the same top-1 as /classify for the same JPEGs, and the protocol's errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service_fixtures import BIN, CLASS_NAMES, REPO, encode, picture

MODEL = "vit-classifier"


@pytest.fixture(scope="module")
def served(tiny_model_server):
    """conftest's tiny_model_server (fp32, one worker; its log checked for tracebacks at the end):
    (url, the served model's version)."""
    url, home = tiny_model_server
    (version,) = [p.name for p in (home / "models" / MODEL).iterdir() if p.is_dir()]
    return url, version


@pytest.fixture(scope="module")
def client(served) -> triton.InferenceServerClient:
    url, _ = served
    return triton.InferenceServerClient(url.removeprefix("http://"))


JPEGS = [encode(picture(300 + i), "JPEG") for i in range(3)]


def image_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def test_health_and_metadata(client, served):
    _, version = served
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, version)
    meta = client.get_model_metadata(MODEL, version)
    assert meta["name"] == MODEL and meta["versions"] == [version]
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {("image", "BYTES"), ("pixels", "UINT8")}
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in meta["outputs"]} == {
        ("probabilities", "FP32", (-1, len(CLASS_NAMES))), ("labels", "BYTES", (-1, -1))}


def test_infer_gives_the_same_answer_as_classify(client, served):
    url, version = served
    result = client.infer(MODEL, [image_input(JPEGS)], model_version=version)  # binary in and out
    probs, labels = result.as_numpy("probabilities"), result.as_numpy("labels")
    assert probs.shape == (3, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert labels.shape == (3, 4)  # top 5, capped at the 4 classes
    for data, row_probs, row_labels in zip(JPEGS, probs, labels):
        classify = httpx.post(f"{url}/classify", files={"image": ("a.jpg", data, "image/jpeg")}, timeout=60).json()
        served_scores = {p["label"]: p["score"] for p in classify["predictions"]}
        assert [label.decode() for label in row_labels] == [p["label"] for p in classify["predictions"]]
        np.testing.assert_allclose([row_probs[CLASS_NAMES.index(k)] for k in served_scores],
                                   list(served_scores.values()), atol=1e-6)


def test_pixels_and_json_outputs(client):
    """UINT8 pixels (as the service decodes them) give the same answer as the encoded image; the
    outputs asked for in JSON come back as JSON, with top_k honoured."""
    from vit_service.preprocessing import Preprocessing, decode_image

    pre = Preprocessing(image_size=32, crop_pct=1.0)  # the tiny model's
    pixels = np.stack([pre.to_uint8(decode_image(d, draft_size=pre.resize_size)).numpy() for d in JPEGS[:2]])  # (2, 3, 32, 32)
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    out = [triton.InferRequestedOutput("labels", binary_data=False)]
    by_pixels = client.infer(MODEL, [tensor], outputs=out, parameters={"top_k": 2})
    by_image = client.infer(MODEL, [image_input(JPEGS[:2])], outputs=out, parameters={"top_k": 2})
    answer = by_pixels.get_response()
    assert answer["model_name"] == MODEL and answer["outputs"][0]["shape"] == [2, 2]
    assert isinstance(answer["outputs"][0]["data"][0], str)  # JSON, not binary
    assert by_pixels.as_numpy("labels").tolist() == by_image.as_numpy("labels").tolist()


@pytest.mark.parametrize("what,make,status,fragment", [
    ("wrong datatype", lambda: [triton.InferInput("image", [1], "FP32")], 400, "datatype BYTES"),
    ("wrong shape", lambda: [triton.InferInput("pixels", [1, 3, 8, 8], "UINT8")], 400, "shape [N, 3, 32, 32]"),
    ("unknown input", lambda: [triton.InferInput("tokens", [1], "BYTES")], 400, "unknown input 'tokens'"),
    ("not an image", lambda: [b"hello"], 400, "image #1: not a recognised image format"),
])
def test_bad_inputs_are_protocol_errors(client, what, make, status, fragment):
    inputs = make()
    if isinstance(inputs[0], bytes):
        inputs = [image_input(inputs)]
    for tensor in inputs:
        if tensor.datatype() == "FP32":
            tensor.set_data_from_numpy(np.zeros(tensor.shape(), np.float32))
        elif tensor.datatype() == "UINT8" and tensor._raw_data is None:
            tensor.set_data_from_numpy(np.zeros(tensor.shape(), np.uint8))
        elif tensor.datatype() == "BYTES" and tensor._raw_data is None and tensor._data is None:
            tensor.set_data_from_numpy(np.array([b"x"] * tensor.shape()[0], dtype=np.object_))
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, inputs)
    assert e.value.status() == str(status) and fragment in e.value.message(), (e.value.status(), e.value.message())


IMAGE_SPEC = {"name": "image", "datatype": "BYTES", "shape": [1]}


MALFORMED = [  # (what, JSON header, binary part, Inference-Header-Content-Length, fragment of the 400)
    # found by tests/test_fuzz_uploads.py: each was a 500 (an AttributeError or TypeError)
    ("outputs not a list", {"inputs": [{**IMAGE_SPEC, "data": ["x"]}], "outputs": True}, b"", None,
     '"outputs" must be a list'),
    ("input parameters not an object", {"inputs": [{**IMAGE_SPEC, "parameters": [1]}]}, b"", None,
     "\"parameters\" of input 'image' must be an object"),
    ("output parameters not an object", {"inputs": [{**IMAGE_SPEC, "data": ["x"]}],
                                         "outputs": [{"name": "labels", "parameters": [[None]]}]}, b"", None,
     "\"parameters\" of output 'labels' must be an object"),
    ("request parameters not an object", {"inputs": [{**IMAGE_SPEC, "data": ["x"]}], "parameters": "x"}, b"", None,
     "\"parameters\" of the request must be an object"),
    # were read from the wrong end of the body (a negative slice)
    ("negative binary_data_size", {"inputs": [{**IMAGE_SPEC, "parameters": {"binary_data_size": -4}}]},
     b"\0\0\0\0", None, "binary_data_size -4 is not a byte count"),
    ("boolean binary_data_size", {"inputs": [{**IMAGE_SPEC, "parameters": {"binary_data_size": True}}]},
     b"\0\0\0\0", None, "binary_data_size True is not a byte count"),
    ("negative header length", {"inputs": [{**IMAGE_SPEC, "data": ["x"]}]}, b" ", "-1", "not valid JSON"),
]


@pytest.mark.parametrize("what,head,binary,header_length,fragment", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_infer_requests_are_400_not_500(what, head, binary, header_length, fragment):
    """The request parser on its own: each mistake a RequestError(400) naming it."""
    from vit_service.serving.errors import RequestError
    from vit_service.serving.inference_protocol import parse_infer_request

    text = json.dumps(head).encode()
    length = header_length if header_length is not None else (str(len(text)) if binary else None)
    with pytest.raises(RequestError) as e:
        parse_infer_request(text + binary, length)
    assert e.value.status == 400 and fragment in e.value.message, e.value.message


def test_unknown_model_or_version_is_404_in_the_protocols_shape(client, served):
    url, version = served
    for call in (lambda: client.get_model_metadata("resnet50"), lambda: client.get_model_metadata(MODEL, "v999"),
                 lambda: client.infer(MODEL, [image_input(JPEGS[:1])], model_version="v999")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == "404" and "unknown model" in e.value.message()
    r = httpx.post(f"{url}/v2/models/{MODEL}/infer", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error"} and "not valid JSON" in r.json()["error"]


def test_the_docs_example_runs_as_written(served, tmp_path):
    """docs/serving.md's tritonclient example, verbatim but for the address, beside a cat.jpg."""
    url, _ = served
    docs = (REPO / "docs/serving.md").read_text()
    section = docs[docs.index("## Open Inference Protocol"):docs.index("## API keys")]
    [snippet] = re.findall(r"```python\n(.*?)```", section, re.S)
    (tmp_path / "cat.jpg").write_bytes(JPEGS[0])
    out = subprocess.run([str(BIN / "python"), "-c", snippet.replace("localhost:3000", url.removeprefix("http://"))],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    first, shape = out.stdout.strip().splitlines()
    assert json.loads(first.replace("b'", "'").replace(" '", ", '").replace("'", '"'))[0] in CLASS_NAMES
    assert shape == f"(1, {len(CLASS_NAMES)})"
