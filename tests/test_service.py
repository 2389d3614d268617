"""The BentoML service, tested for real: a `bentoml serve` subprocess on a loopback port, called
with the curl binary and httpx, real image bytes, and the service classes called in-process.

A tiny random-init model (32 px, 4 classes) is saved into a temporary BENTOML_HOME; its answers
are checked against running the same model directly on the same bytes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import bentoml
import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from service_fixtures import (BIN, CLASS_NAMES, REPO, assert_matches, bentoml_server, check_predictions, classify, classify_all_at_once, encode,
                              metric_value, picture, png_header_only, read_http_response, unusual_images, batch_histogram,
                              poll, wait_warm)
from service_fixtures import reference, store  # noqa: F401  (session fixtures, shared by tests/test_service*.py)
from vit_service.preprocessing import decode_image

MAX_BODY = 2 * 2**20  # small limits, so the tests that exceed them stay fast
MAX_IMAGES = 8
TIMEOUT_S = 8
MAX_CONCURRENCY = 40
SERVER_ENV = {
    "VIT_PRECISION": "fp32",  # scores are compared with the fp32 reference at 1e-5
    "VIT_MAX_BODY_BYTES": str(MAX_BODY),
    "VIT_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
    "VIT_TIMEOUT": str(TIMEOUT_S),
    "VIT_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
    "VIT_MAX_LATENCY_MS": "20000",  # 2 loaded cores: no 503 from the batcher in these tests
    "VIT_MODE": "inprocess",  # what `auto` picks on a CPU-only host; tests/test_service_modes.py has split mode
    "VIT_DECODE_THREADS": "3",  # not the host default, so its effect is visible
    "VIT_WORKERS": "1",  # one front: max_concurrency and batching are per worker (two: tests/test_faults.py)
    "VIT_TORCH_THREADS": "1",  # not torch's default on this host (one per core), so its effect is visible
}


@pytest.fixture(scope="module")
def server(store, tmp_path_factory: pytest.TempPathFactory):
    home, _ = store
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with bentoml_server(home, log, env=SERVER_ENV) as url:
        yield url, log
        # Nothing a client sent may have made the server fail: no 500 anywhere in its log.
        text = log.read_text()
        assert "status=500" not in text and "Traceback" not in text, text[-4000:]


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


# ------------------------------------------------------------------------- the happy path

def test_classify_agrees_with_the_model_run_directly(client, reference):
    seen_top1 = set()
    for seed in range(6):
        data = encode(picture(seed), "JPEG" if seed % 2 else "PNG")
        r = classify(client, data)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert set(body) == {"predictions"}
        check_predictions(body["predictions"], k=4)  # default top_k 5, capped at the 4 classes
        assert sum(p["score"] for p in body["predictions"]) == pytest.approx(1.0, abs=1e-4)
        assert_matches(body["predictions"], reference(data))
        seen_top1.add(body["predictions"][0]["index"])
    assert len(seen_top1) > 1, "every image got the same label: the comparison would prove little"


def test_top_k_as_form_field_or_query_parameter(client, reference):
    data = encode(picture(21), "PNG")
    by_form = classify(client, data, top_k="2")
    by_query = client.post("/classify?top_k=1", files={"image": ("a.png", data, "image/png")})
    assert by_form.status_code == by_query.status_code == 200
    check_predictions(by_form.json()["predictions"], k=2)
    check_predictions(by_query.json()["predictions"], k=1)
    assert_matches(by_form.json()["predictions"], reference(data))


def test_classify_batch_keeps_upload_order(client, reference):
    images = [encode(picture(30 + i), "JPEG") for i in range(5)]
    files = [("images", (f"img{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    r = client.post("/classify_batch", files=files, data={"top_k": "3"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(images)
    for result, data in zip(results, images):
        assert set(result) == {"predictions"}
        check_predictions(result["predictions"], k=3)
        assert_matches(result["predictions"], reference(data))


def test_real_curl(url, tmp_path, reference):
    a, b = tmp_path / "a.jpg", tmp_path / "b.png"
    a.write_bytes(encode(picture(40), "JPEG"))
    b.write_bytes(encode(picture(41), "PNG"))

    def curl(*args: str) -> tuple[int, dict]:
        out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        body, status = out.stdout.rsplit("\n", 1)
        return int(status), json.loads(body)

    status, body = curl("-F", f"image=@{a}", f"{url}/classify")
    assert status == 200
    assert_matches(body["predictions"], reference(a.read_bytes()))
    status, body = curl("-F", f"images=@{a}", "-F", f"images=@{b}", "-F", "top_k=2", f"{url}/classify_batch")
    assert status == 200
    assert [len(r["predictions"]) for r in body["results"]] == [2, 2]
    assert_matches(body["results"][1]["predictions"], reference(b.read_bytes()))
    status, body = curl("-F", f"file=@{a}", f"{url}/classify")  # a typical mistake
    assert status == 400 and "'image'" in body["error"]


def readme_python_snippet() -> str:
    """The first ```python block under "## Python client" in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python client"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_python_client(url, tmp_path, reference):
    """The README's BentoML client snippet, verbatim but for the URL, run in a fresh interpreter
    next to a cat.jpg."""
    snippet = readme_python_snippet()
    assert "http://localhost:3000" in snippet and "bentoml.SyncHTTPClient" in snippet
    image = tmp_path / "cat.jpg"
    image.write_bytes(encode(picture(42), "JPEG"))
    out = subprocess.run([str(BIN / "python"), "-c", snippet.replace("http://localhost:3000", url)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    printed = [line for line in out.stdout.splitlines() if line.strip()]
    assert printed, out.stdout
    expected = reference(image.read_bytes())
    top = json.loads(printed[0].replace("'", '"'))
    check_predictions(top, k=len(top))
    assert_matches(top, expected)


def test_bentoml_clients_round_trip(url, tmp_path, reference):
    """`bentoml.SyncHTTPClient(url).classify(image=Path(...))` and friends, and the async client."""
    a, b = tmp_path / "a.jpg", tmp_path / "b.png"
    a.write_bytes(encode(picture(43), "JPEG"))
    b.write_bytes(encode(picture(44), "PNG"))
    with bentoml.SyncHTTPClient(url) as client:
        one = client.classify(image=a)
        assert set(one) == {"predictions"}
        check_predictions(one["predictions"], k=4)
        assert_matches(one["predictions"], reference(a.read_bytes()))
        two = client.classify(image=b, top_k=2)
        check_predictions(two["predictions"], k=2)
        batch = client.classify_batch(images=[a, b], top_k=3)
        assert [len(r["predictions"]) for r in batch["results"]] == [3, 3]
        assert_matches(batch["results"][1]["predictions"], reference(b.read_bytes()))
        pil = client.classify(image=Image.open(b))  # a PIL image works too
        assert_matches(pil["predictions"], reference(b.read_bytes()))
        assert client.model_info()["class_names"] == CLASS_NAMES

    async def use_async() -> dict:
        async with bentoml.AsyncHTTPClient(url) as client:
            return await client.classify(image=a, top_k=1)

    check_predictions(asyncio.run(use_async())["predictions"], k=1)


@pytest.mark.parametrize("name", sorted(unusual_images()))
def test_unusual_but_valid_images_are_classified(client, reference, name):
    data, ctype = unusual_images()[name]
    r = classify(client, data, name=name, ctype=ctype)
    assert r.status_code == 200, r.text
    assert_matches(r.json()["predictions"], reference(data))


def test_model_info(client, store):
    _, tag = store
    r = client.get("/model_info")
    assert r.status_code == 200
    info = r.json()
    assert info["model_tag"] == tag
    assert info["class_names"] == CLASS_NAMES and info["num_classes"] == 4
    assert info["input_size"] == [3, 32, 32]
    assert info["preprocessing"]["image_size"] == 32 and info["preprocessing"]["crop_pct"] == 1.0
    assert info["model_config"]["patch_size"] == 8
    assert info["metadata"]["trained_by"] == "tests/service_fixtures.py"
    assert info["serving"]["device"] == "cpu" and info["serving"]["precision"] == "fp32"
    assert info["serving"]["max_images_per_request"] == MAX_IMAGES
    assert info["serving"]["max_body_bytes"] == MAX_BODY
    assert "_instantiator" not in info["metadata"]  # internal keys stay inside
    # The settings' effect, reported by the live objects: the decode pool's own size and
    # torch.get_num_threads() in the model's process (not the settings echoed back).
    assert info["serving"]["workers"] == 1
    assert info["serving"]["decode_threads"] == 3
    assert len(os.sched_getaffinity(0)) >= 2  # so torch's default (one thread per core) is not 1
    assert info["serving"]["torch_threads"] == 1


def test_bentoml_endpoints_keep_working(client):
    for path in ("/healthz", "/livez", "/readyz"):
        assert client.get(path).status_code == 200, path
    ui = client.get("/")
    assert ui.status_code == 200 and "html" in ui.headers["content-type"]
    spec = client.get("/docs.json").json()
    assert {"/classify", "/classify_batch", "/model_info", "/readyz", "/metrics"} <= set(spec["paths"])
    # GET /model_info, as the README's curl sends it (POST stays for BentoML's client)
    assert "requestBody" not in spec["paths"]["/model_info"]["get"] and "post" in spec["paths"]["/model_info"]
    for path, field in (("/classify", "image"), ("/classify_batch", "images")):
        form = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        upload = form["properties"][field]
        upload = upload.get("items", upload)  # /classify_batch: an array of files
        assert upload["format"] == "binary" and field in form["required"], form  # a file-upload field
        assert "top_k" in form["properties"]
    assert "bentoml_service_request" in client.get("/metrics").text


def test_stage_metrics_and_server_timing(client, store):
    before = client.get("/metrics").text
    ok = classify(client, encode(picture(61), "JPEG"))
    bad_image = classify(client, b"not an image", name="x.txt")
    bad_field = client.post("/classify", files={"file": ("a.jpg", encode(picture(61), "JPEG"), "image/jpeg")})
    assert (ok.status_code, bad_image.status_code, bad_field.status_code) == (200, 400, 400)
    timing = dict(re.findall(r"(\w+);dur=([\d.]+)", ok.headers["server-timing"]))
    assert {"read", "parse", "decode", "queue", "forward", "serialize"} <= set(timing), timing
    assert "decode" in bad_image.headers["server-timing"]  # stages also on errors
    batch = client.post("/classify_batch", files=[("images", ("a.jpg", encode(picture(62), "JPEG"), "image/jpeg")),
                                                  ("images", ("b.png", encode(picture(63), "PNG"), "image/png"))])
    assert batch.status_code == 200, batch.text
    batch_timing = dict(re.findall(r"(\w+);dur=([\d.]+)", batch.headers["server-timing"]))
    assert {"read", "parse", "decode", "queue", "forward", "serialize"} <= set(batch_timing), batch_timing
    assert all(float(v) >= 0 for v in batch_timing.values())
    after = client.get("/metrics").text
    for stage in ("read", "parse", "decode", "queue", "forward", "serialize"):
        assert metric_value(after, "vit_stage_seconds_count", stage=stage) > metric_value(before, "vit_stage_seconds_count", stage=stage), stage
    assert metric_value(after, "vit_batch_size_count") > metric_value(before, "vit_batch_size_count")
    for labels in ({"endpoint": "classify", "outcome": "ok"}, {"endpoint": "classify", "outcome": "rejected"}):
        assert metric_value(after, "vit_images_total", **labels) == metric_value(before, "vit_images_total", **labels) + 1
    for reason in ("bad_image", "missing_field"):
        assert metric_value(after, "vit_rejected_uploads_total", reason=reason) == \
            metric_value(before, "vit_rejected_uploads_total", reason=reason) + 1
    _, tag = store
    assert f'service_version="{tag}"' in after


def test_unknown_paths_fold_into_one_metrics_label(client):
    assert client.get("/no-such-page-1").status_code == 404
    count = len(client.get("/metrics").text.splitlines())
    for i in range(2, 6):
        assert client.get(f"/no-such-page-{i}?x={i}").status_code == 404
    text = client.get("/metrics").text
    assert len(text.splitlines()) == count, "a request to a new unknown path added metric series"
    assert "no-such-page" not in text and 'endpoint="/__unknown__"' in text
    assert 'endpoint="/classify"' in text  # known paths keep their own label


# ----------------------------------------------------------------------------- batching

def test_concurrent_requests_share_forward_passes(client, url, reference):
    images = [encode(picture(100 + i), "JPEG") for i in range(32)]
    expected = [int(np.argmax(reference(d))) for d in images]
    batches0, requests0, singles0 = batch_histogram(client)
    responses = classify_all_at_once(url, images)
    assert [r.status_code for r in responses] == [200] * len(images), [r.text for r in responses if r.status_code != 200]
    assert [r.json()["predictions"][0]["index"] for r in responses] == expected
    batches1, requests1, singles1 = batch_histogram(client)
    batches, requests = batches1 - batches0, requests1 - requests0
    assert requests == len(images)
    assert batches < requests, f"{requests:.0f} requests ran in {batches:.0f} forward passes: no batching"
    assert singles1 - singles0 < batches


# --------------------------------------------------------------- bad input: 4xx, never 500

def _bad_cases() -> dict[str, tuple[dict, int, str]]:
    jpeg = encode(picture(50), "JPEG")
    ok = ("ok.jpg", jpeg, "image/jpeg")
    return {
        "text file": ({"files": {"image": ("notes.txt", b"hello, not an image\n", "text/plain")}}, 400, "not a recognised image"),
        "text labelled jpeg": ({"files": {"image": ("x.jpg", b"GIF89a but not really", "image/jpeg")}}, 400, "x.jpg"),
        "empty file": ({"files": {"image": ("empty.jpg", b"", "image/jpeg")}}, 400, "empty"),
        "truncated jpeg": ({"files": {"image": ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}}, 400, "truncated"),
        "header-only jpeg": ({"files": {"image": ("cut.jpg", jpeg[:200], "image/jpeg")}}, 400, "cut.jpg"),
        "decompression bomb": ({"files": {"image": ("bomb.png", png_header_only(40_000, 40_000), "image/png")}}, 400, "limit"),
        "too many pixels": ({"files": {"image": ("big.png", png_header_only(10_000, 5_000), "image/png")}}, 400, "limit"),
        "misnamed field": ({"files": {"file": ok}}, 400, "'image'"),
        "only top_k": ({"files": {"top_k": (None, "3")}}, 400, "missing form field 'image'"),
        "text instead of file": ({"files": {"image": (None, "http://169.254.169.254/latest")}}, 400, "must be a file"),
        "unknown extra field": ({"files": {"image": ok, "topk": (None, "3")}}, 400, "'topk'"),
        "two images": ({"files": [("image", ok), ("image", ok)]}, 400, "/classify_batch"),
        "top_k zero": ({"files": {"image": ok}, "data": {"top_k": "0"}}, 400, "between 1 and 4"),
        "top_k too big": ({"files": {"image": ok}, "data": {"top_k": "5"}}, 400, "between 1 and 4"),
        "top_k negative": ({"files": {"image": ok}, "data": {"top_k": "-1"}}, 400, "top_k"),
        "top_k not int": ({"files": {"image": ok}, "data": {"top_k": "three"}}, 400, "integer"),
        "top_k float": ({"files": {"image": ok}, "data": {"top_k": "2.5"}}, 400, "integer"),
        "top_k with underscore": ({"files": {"image": ok}, "data": {"top_k": "1_0"}}, 400, "integer"),
        "top_k plus sign": ({"files": {"image": ok}, "data": {"top_k": "+2"}}, 400, "integer"),
        "top_k twice": ({"files": {"image": ok}, "data": {"top_k": ["1", "2"]}}, 400, "top_k"),
        "top_k as file": ({"files": {"image": ok, "top_k": ("k.txt", b"2", "text/plain")}}, 400, "top_k"),
        "json body": ({"json": {"image": "cat.jpg"}}, 415, "multipart/form-data"),
        "no body": ({}, 415, "multipart/form-data"),
        "urlencoded url": ({"data": {"image": "http://127.0.0.1:1/x.jpg"}}, 400, "must be a file"),
        "raw jpeg body": ({"content": jpeg, "headers": {"content-type": "image/jpeg"}}, 415, "'image'"),
        "multipart without boundary": ({"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, "multipart"),
        "multipart garbage": ({"content": b"nonsense", "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400, "malformed multipart"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_upload_to_classify(client, case):
    kwargs, status, fragment = BAD[case]
    r = client.post("/classify", **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert fragment in body["error"]


def test_wrong_method_is_405_json(client):
    r = client.get("/classify")
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}
    assert "POST" in r.headers["allow"]


def test_bad_uploads_to_classify_batch(client):
    good = encode(picture(60), "PNG")
    cases = [
        ({"files": [("images", ("a.png", good, "image/png"))] * (MAX_IMAGES + 1)}, 413, f"limit is {MAX_IMAGES}"),
        ({"files": [("images", ("a.png", good, "image/png")), ("images", ("bad.png", b"\x89PNG\r\n", "image/png"))]}, 400, "bad.png"),
        ({"files": [("image", ("a.png", good, "image/png"))]}, 400, "missing form field 'images'"),
        ({"files": [("images", ("a.png", good, "image/png"))], "data": {"top_k": "7"}}, 400, "between 1 and 4"),
    ]
    for kwargs, status, fragment in cases:
        r = client.post("/classify_batch", **kwargs)
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"], r.text
    at_limit = client.post("/classify_batch", files=[("images", ("a.png", good, "image/png"))] * MAX_IMAGES)
    assert at_limit.status_code == 200 and len(at_limit.json()["results"]) == MAX_IMAGES


def bad_files(tmp: Path) -> dict[str, tuple[Path, int, str]]:
    """Bad image files a user may pick: name -> (path, status, fragment of the error)."""
    jpeg = encode(picture(51), "JPEG")
    files = {
        "text file": ("notes.txt", b"hello, not an image\n", 400, "not a recognised image"),
        "empty file": ("empty.jpg", b"", 400, "empty"),
        "truncated jpeg": ("cut.jpg", jpeg[: len(jpeg) // 2], 400, "truncated"),
        "decompression bomb": ("bomb.png", png_header_only(40_000, 40_000), 400, "limit"),
        "body over the limit": ("big.jpg", b"\xff\xd8" + bytes(MAX_BODY), 413, "limit"),
    }
    out = {}
    for case, (name, data, status, fragment) in files.items():
        (tmp / name).write_bytes(data)
        out[case] = (tmp / name, status, fragment)
    return out


def curl_json(*args: str) -> tuple[int, dict]:
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    body, status = out.stdout.rsplit("\n", 1)
    return int(status), json.loads(body)


def test_every_mistake_is_4xx_json_through_curl_and_the_bentoml_client(url, tmp_path):
    """Each bad input, sent by real curl and by bentoml.SyncHTTPClient: the same 4xx and
    {"error": ...} message; the client raises a BentoMLException carrying the status."""
    good = tmp_path / "good.jpg"
    good.write_bytes(encode(picture(52), "JPEG"))
    cases = [(case, ["-F", f"image=@{path}"], {"image": path}, "classify", status, fragment)
             for case, (path, status, fragment) in bad_files(tmp_path).items()]
    cases += [
        ("top_k zero", ["-F", f"image=@{good}", "-F", "top_k=0"], {"image": good, "top_k": 0}, "classify", 400, "between 1 and 4"),
        ("top_k too big", ["-F", f"image=@{good}", "-F", "top_k=5"], {"image": good, "top_k": 5}, "classify", 400, "between 1 and 4"),
        ("top_k not int", ["-F", f"image=@{good}", "-F", "top_k=three"], {"image": good, "top_k": "three"}, "classify", 400, "integer"),
        ("text instead of file", ["-F", "image=http://169.254.169.254/latest"], {"image": "http://169.254.169.254/latest"},
         "classify", 400, "must be a file"),
        ("too many images", [arg for _ in range(MAX_IMAGES + 1) for arg in ("-F", f"images=@{good}")],
         {"images": [good] * (MAX_IMAGES + 1)}, "classify_batch", 413, f"limit is {MAX_IMAGES}"),
        ("bad image in a batch", ["-F", f"images=@{good}", "-F", f"images=@{tmp_path / 'notes.txt'}"],
         {"images": [good, tmp_path / "notes.txt"]}, "classify_batch", 400, "notes.txt"),
    ]
    with bentoml.SyncHTTPClient(url) as client:
        for case, curl_args, kwargs, endpoint, status, fragment in cases:
            got, body = curl_json(*curl_args, f"{url}/{endpoint}")
            assert (got, set(body)) == (status, {"error"}), (case, body)
            assert fragment in body["error"], (case, body)
            with pytest.raises(bentoml.exceptions.BentoMLException) as e:
                getattr(client, endpoint)(**kwargs)
            assert int(e.value.error_code) == status, (case, str(e.value))
            assert json.loads(str(e.value)) == body, case
        # A misnamed field cannot be sent through the typed client: its own HTTP session can.
        misnamed = client.client.post("/classify", files={"file": good.read_bytes()})
        assert misnamed.status_code == 400 and "'image'" in misnamed.json()["error"]
        got, body = curl_json("-F", f"file=@{good}", f"{url}/classify")
        assert got == 400 and body == misnamed.json()


def test_body_over_the_limit_is_413_declared_or_streamed(client, url, tmp_path):
    big = np.random.default_rng(0).integers(0, 255, MAX_BODY + 1000, dtype=np.uint8).tobytes()
    declared = classify(client, big, name="big.jpg")  # with Content-Length
    assert declared.status_code == 413 and "limit" in declared.json()["error"]

    def chunks():  # no Content-Length: chunked transfer encoding, counted as it streams
        boundary = b"b0undary"
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
        yield b"\r\n--" + boundary + b"--\r\n"

    streamed = client.post("/classify", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b0undary"})
    assert streamed.status_code == 413 and "limit" in streamed.json()["error"]

    path = tmp_path / "big.jpg"
    path.write_bytes(big)
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-F", f"image=@{path}", f"{url}/classify"],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.rsplit("\n", 1)[1] == "413", out


def test_overload_is_429_and_slow_requests_504(url):
    """Requests beyond max_concurrency get 429 at once; a request past the timeout gets 504.

    Slow uploads (headers sent, body never finished) hold the front's concurrency slots."""
    host, port = urlparse(url).hostname, urlparse(url).port
    head = (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            f"Content-Length: 1000\r\n\r\n--zz\r\n").encode()
    holders = []
    try:
        for _ in range(MAX_CONCURRENCY):
            s = socket.create_connection((host, port), timeout=TIMEOUT_S + 20)
            s.sendall(head)
            holders.append(s)
        # The server takes the held connections in as it gets to them; until it holds them all a
        # request may still get through. Once it does, every request is refused, whatever the
        # machine's speed: the condition awaited is the refusal itself.
        r = poll(lambda: httpx.post(f"{url}/classify", files={"image": ("a.png", PNG_1, "image/png")}, timeout=30),
                 until=lambda r: r.status_code != 200)
        assert r.status_code == 429 and r.json() == {"error": "Too many requests"}
        assert httpx.get(f"{url}/readyz").status_code == 200  # probes bypass the limit
        status_line, body = read_http_response(holders[0])  # blocks until the timeout fires
        assert status_line.startswith("HTTP/1.1 504"), status_line
        assert json.loads(body) == {"error": f"Not able to process the request in {TIMEOUT_S} seconds"}
    finally:
        for s in holders:
            s.close()
    # The slots free up as the server sees the connections close.
    r = poll(lambda: httpx.post(f"{url}/classify", files={"image": ("a.png", PNG_1, "image/png")}, timeout=30),
             until=lambda r: r.status_code == 200)
    assert r.status_code == 200


PNG_1 = encode(picture(1), "PNG")


def test_upload_cut_short_is_408(url, client):
    """A client that sends half its declared body and stops (half-closes) gets 408, not 500.
    The server (uvicorn) drops a half-closed connection, so the 408 is usually never delivered:
    what the test sees is the answer if one comes, and the server counting the request as an
    incomplete body in /metrics."""
    def incomplete() -> float:
        return metric_value(client.get("/metrics").text, "vit_rejected_uploads_total", reason="incomplete_body")

    before = incomplete()
    host, port = urlparse(url).hostname, urlparse(url).port
    part = (b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + PNG_1)
    head = (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            f"Content-Length: {2 * len(part)}\r\n\r\n").encode()
    with socket.create_connection((host, port), timeout=TIMEOUT_S + 20) as s:
        s.sendall(head + part)
        s.shutdown(socket.SHUT_WR)  # the rest of the body never comes
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    # Whether uvicorn still delivers an answer to a half-closed socket is its business: if one
    # comes, it is the 408; the answer itself is checked below, at the ASGI level, every time.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert poll(incomplete, until=lambda n: n == before + 1) == before + 1


def test_upload_cut_short_is_answered_408_json():
    """The HTTP front itself, driven as uvicorn drives it: half the declared body, then
    `http.disconnect`. It must answer 408 with the JSON error and count the rejection, and never
    call the app behind it."""
    from vit_service.serving import metrics
    from vit_service.serving.http import HttpFront
    from vit_service.serving.service import ViTClassifier

    part = (b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + PNG_1)
    incoming = [{"type": "http.request", "body": part, "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):
        raise AssertionError("an incomplete upload reached the app")

    rejected = metrics.rejected_uploads_total.labels(reason="incomplete_body")
    before = rejected._value.get()
    front = HttpFront(app, service=ViTClassifier, max_bytes=MAX_BODY, max_files=MAX_IMAGES)
    scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=zz"),
                         (b"content-length", str(2 * len(part)).encode())]}
    asyncio.run(front(scope, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    assert start["type"] == "http.response.start" and start["status"] == 408
    assert json.loads(body) == {"error": "the request body ended before it was complete"}
    assert rejected._value.get() == before + 1 and incoming == []


def test_server_still_serves_after_everything(client, reference):
    data = encode(picture(70), "JPEG")
    r = classify(client, data)
    assert r.status_code == 200
    assert_matches(r.json()["predictions"], reference(data))
    assert client.get("/readyz").status_code == 200


# ------------------------------------------------------------------ in-process, no HTTP

@pytest.fixture(scope="module")
def services(store):
    """A ViTClassifier in this process, reading the temporary model store, in fp32 (the
    reference's precision)."""
    import dataclasses

    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    from vit_service.serving import service
    from vit_service.serving.model_handle import InProcessModel

    home, _ = store
    BentoMLContainer.model_store.set(ModelStore(home / "models"))
    saved = service.SETTINGS
    service.SETTINGS = dataclasses.replace(saved, precision="fp32", model_watch_s=0)  # no store to follow here
    try:
        front = service.ViTClassifier()
        assert isinstance(front.model, InProcessModel)
        wait_warm(front.model)
        yield front
    finally:
        service.SETTINGS = saved
        BentoMLContainer.model_store.reset()


def test_in_process_classify_images(services, reference):
    from vit_service.serving.http import UploadedFile

    front = services
    images = [UploadedFile("a.jpg", encode(picture(80), "JPEG")), UploadedFile("b.png", encode(picture(81), "PNG"))]
    results = asyncio.run(front.classify_images(images, top_k=2))
    assert len(results) == 2
    for preds, (_, data) in zip(results, [(i.name, i.data) for i in images]):
        check_predictions(preds, k=2)
        assert_matches(preds, reference(data))


def test_in_process_errors_carry_status(services):
    from vit_service.serving.errors import RequestError
    from vit_service.serving.http import UploadedFile

    front = services
    ok = UploadedFile("a.jpg", encode(picture(82), "JPEG"))
    for images, top_k, status, fragment in [
        ([ok], 0, 400, "between 1 and 4"),
        ([ok, UploadedFile("broken.gif", b"GIF89a")], None, 400, "broken.gif"),
        ([], None, 400, "no images"),
    ]:
        with pytest.raises(RequestError) as e:
            asyncio.run(front.classify_images(images, top_k=top_k))
        assert e.value.status == status and fragment in e.value.message


def test_model_handle_predict_and_describe(services, reference):
    front = services
    data = encode(picture(83), "PNG")
    info = asyncio.run(front.model.describe())
    pre = info.preprocessing
    batch = np.stack([pre.to_uint8(decode_image(data, draft_size=pre.resize_size)).numpy()] * 3)
    timings: dict[str, float] = {}
    probs = asyncio.run(front.model.predict(batch, timings))
    assert probs.shape == (3, 4) and probs.dtype == np.float32 and {"queue", "forward"} <= set(timings)
    np.testing.assert_allclose(probs, np.stack([reference(data)] * 3), atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    predict_proba = front.model.batcher.forward  # the predictor the batcher calls
    assert predict_proba(np.zeros((0, 3, 32, 32), np.uint8)).shape == (0, 4)
    for wrong in (np.zeros((2, 3, 16, 16), np.uint8), np.zeros((2, 3, 32, 32), np.float32), np.zeros((3, 32, 32), np.uint8)):
        with pytest.raises(ValueError):
            predict_proba(wrong)
    assert info.class_names == CLASS_NAMES and info.description["input_size"] == [3, 32, 32]
    assert asyncio.run(front.__is_ready__())


def test_serving_imports_warn_nothing_deprecated_of_bentoml():
    """The service's metrics use prometheus_client (bentoml.metrics warned it is deprecated)."""
    code = ("import warnings; warnings.simplefilter('always'); w = warnings.catch_warnings(record=True); "
            "caught = w.__enter__(); import vit_service.serving.service; "
            "print([str(x.message)[:80] for x in caught if 'bentoml' in str(x.message).lower()])")
    out = subprocess.run([str(BIN / "python"), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]


def test_serving_imports_no_training_stack():
    code = ("import sys, vit_service.serving.service; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'timm', 'training', 'torchvision'}))")
    out = subprocess.run([str(BIN / "python"), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_served_models_start_imports_no_compiler(tmp_path):
    """What each serving process does with a model before it serves (check_weights, then the backend
    loads and warms it, here on `auto`'s race) never imports torch._dynamo: drawing random values into
    the meta-device model that check_weights and load_model build would (~0.9 s of every process's
    start, the arbiter's and each worker's)."""
    from service_fixtures import save_tiny_folder

    folder = save_tiny_folder(tmp_path / "model")
    code = ("import sys; from pathlib import Path; from vit_service.artifact import check_weights; "
            "from vit_service.backends import load_backend; "
            f"check_weights({str(folder)!r}); "
            f"p = load_backend(Path({str(folder)!r}), backend='auto', device='cpu', precision='fp32', "
            f"cache=Path({str(tmp_path / 'cache')!r})); p.warmup(2); "
            "print(p.backend, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([str(BIN / "python"), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    backend, dynamo = out.stdout.split()[-2:]
    assert backend in ("torch", "openvino") and dynamo == "False", out.stdout


def test_settings_from_env(monkeypatch):
    from vit_service.serving.settings import Settings, available_memory, cpu_workers, host_cores

    for name in ("VIT_WORKERS", "VIT_DECODE_THREADS", "VIT_MAX_BATCH_SIZE", "VIT_MODEL_TAG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VIT_DEVICE", "cpu")  # defaults derived for a CPU-only host
    s = Settings.from_env()
    workers = cpu_workers(host_cores(), available_memory(), 0)  # the rule (test_faults.py tests it)
    decode = max(1, (host_cores() // workers) // 4)  # settings.py: a worker's share of the cores, a quarter decoding
    assert (s.workers, s.decode_threads, s.max_batch_size) == (workers, decode, 16)
    assert s.torch_threads == max(1, host_cores() // workers - decode)
    monkeypatch.setenv("VIT_DECODE_THREADS", "7")
    assert Settings.from_env().decode_threads == 7
    monkeypatch.delenv("VIT_DEVICE")

    monkeypatch.setenv("VIT_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("VIT_COMPILE", "max-autotune")
    monkeypatch.setenv("VIT_MODEL_TAG", "other:v1")
    s = Settings.from_env()
    assert (s.max_batch_size, s.compile_mode, s.model_tag) == (8, "max-autotune", "other:v1")
    for name, value in [("VIT_MAX_BATCH_SIZE", "1"), ("VIT_TIMEOUT", "soon"), ("VIT_MAX_BODY_BYTES", "0"),
                        ("VIT_DEVICE", "tpu"), ("VIT_DECODE_THREADS", "many"), ("VIT_BATCHING", "maybe")]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            Settings.from_env()
        monkeypatch.delenv(name)


# ------------------------------------------------------------------------------ packaging

def test_bentoml_build_packs_the_service_and_model(store, tmp_path):
    home, tag = store
    env_home = tmp_path / "home"
    shutil.copytree(home, env_home)
    env = {**os.environ, "BENTOML_HOME": str(env_home), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([str(BIN / "bentoml"), "build", "--output", "tag"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    bento_tag = re.search(r"__tag__:(\S+)", out.stdout).group(1)
    name, version = bento_tag.split(":")
    bento = env_home / "bentos" / name / version
    sources = {p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()}
    assert "vit_service/serving/service.py" in sources and "vit_service/serving/http.py" in sources
    assert not any(s.startswith("bench/") for s in sources), sources  # the test harness stays out
    assert not any(s.startswith(("training/", "tests/", "configs/")) for s in sources), sources
    # BentoML 1.4 records the model (resolved from vit-classifier:latest) in bento.yaml and copies
    # it from the model store on `bentoml containerize` / `export`.
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    packed = {m["tag"] for svc in manifest["services"] for m in svc["models"]}
    assert packed == {tag}
    lines = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    packages = {re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower() for line in lines if line and not line.startswith("#")}
    assert {"torch", "pillow", "numpy", "safetensors", "bentoml"} <= packages
    assert not packages & {"lightning", "pytorch-lightning", "timm", "torchvision", "vit-service"}, packages


@pytest.mark.slow
def test_bentoml_serve_dot_reads_bentofile(store, tmp_path):
    home, tag = store
    with bentoml_server(home, tmp_path / "serve.log", target=".") as url:
        r = httpx.post(f"{url}/classify", files={"image": ("a.png", encode(picture(3), "PNG"), "image/png")}, timeout=60)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 4
        assert httpx.get(f"{url}/model_info").json()["model_tag"] == tag


# ------------------------------------------------------------------------ inference options

@pytest.fixture(scope="module")
def model_dir(store) -> Path:
    home, tag = store
    name, version = tag.split(":")
    return home / "models" / name / version


def uint8_batch(pre, *datas: bytes) -> np.ndarray:
    return np.stack([pre.to_uint8(decode_image(d, draft_size=pre.resize_size)).numpy() for d in datas])


def test_device_and_precision_choices():
    from vit_service.backends.torch_runtime import resolve_device, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    if torch.cuda.is_available():
        assert resolve_precision("auto", torch.device("cuda")) in ("bf16", "fp16")
    else:
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", cpu)


def test_bf16_autocast_stays_close_to_fp32(model_dir, reference):
    from vit_service.backends import load_backend

    predictor = load_backend(model_dir, backend="torch", device="cpu", precision="bf16")
    fp32 = load_backend(model_dir, backend="torch", device="cpu", precision="fp32")
    seen = []  # the dtype a Linear layer computed in, inside the forward pass
    predictor.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    datas = [encode(picture(s), "PNG") for s in range(1, 9)]
    batch = uint8_batch(predictor.preprocessing, *datas)
    probs = predictor.predict_proba(batch)
    expected = np.stack([reference(d) for d in datas])
    assert seen == [torch.bfloat16]  # autocast was entered: the matmul ran in bf16
    assert predictor.describe()["precision"] == "bf16" and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)  # the softmax runs in fp32
    # Not the fp32 numbers (bf16 keeps 8 significant bits), yet close to them and the same top-1.
    assert np.abs(probs - fp32.predict_proba(batch)).max() > 1e-6
    # bf16 keeps 8 significant bits (rounding error 2^-8 = 0.4% per operation). The tiny model's
    # logits reach ~30 (its head is scaled up), so after two blocks a logit is off by ~0.15 (0.5%),
    # which moves a probability by at most 2 x 0.25 x 0.15 = 0.075, about 0.025 measured.
    np.testing.assert_allclose(probs, expected, atol=0.05)
    assert (probs.argmax(-1) == expected.argmax(-1)).all()


def test_cpu_precision_rule():
    from vit_service.host import is_faster  # the one rule behind the warm-up race's verdict

    assert is_faster(0.080, 0.100)  # bf16 20% faster: taken
    assert not is_faster(0.095, 0.100)  # 5%: not worth the precision
    assert not is_faster(0.140, 0.100)


FAKE_BF16_CPU = "model name\t: Fake Xeon (Sapphire Rapids)\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.mark.parametrize("bf16_s, chosen", [(0.080, "bf16"), (0.095, "fp32")])
def test_cpu_bf16_is_a_candidate_the_decision_keeps_by_its_timings_and_runs(model_dir, monkeypatch, tmp_path,
                                                                          bf16_s, chosen):
    """On a CPU with bf16 instructions (faked), torch fp32 and torch bf16 are the decision's
    candidates, raced at warm-up (backends/decision.py). Here the timings are given (a clock that a
    forward pass advances by 0.100 s in fp32 and `bf16_s` in bf16), so the choice is known in
    advance; the forward pass then runs in it (seen by a hook on a Linear layer)."""
    import time

    from vit_service.backends import decision, load_backend
    from vit_service.backends.torch_runtime import TorchRuntime
    from vit_service.host import read_cpu

    now = [0.0]
    real_faster, real_forward = decision.faster, TorchRuntime.forward
    # The race's clock is the fake one (its wall-time budget stays real, so it ends).
    monkeypatch.setattr(decision, "faster", lambda candidate, baseline, **kw: real_faster(
        candidate, baseline, **{**kw, "clock": lambda: now[0], "budget_clock": time.perf_counter}))

    def timed_forward(runtime, pixels):
        now[0] += {"fp32": 0.100, "bf16": bf16_s}[runtime.precision]
        return real_forward(runtime, pixels)

    monkeypatch.setattr(TorchRuntime, "forward", timed_forward)
    predictor = load_backend(model_dir, backend="torch", device="cpu", precision="auto",
                             cpu=read_cpu(FAKE_BF16_CPU), cache=tmp_path)
    assert predictor.backend == "not chosen yet"
    predictor.warmup(max_batch_size=4)
    made = predictor.describe()["decision"]
    assert (made["backend"], made["precision"], made["batch"]) == ("torch", chosen, 4)
    assert made["rates_img_s"] == {"torch fp32": 40.0, "torch bf16": round(4 / bf16_s, 2)}
    assert made["verdicts"] == [f"torch bf16 {0.1 / bf16_s:.2f}x torch fp32: "
                                f"{'faster' if chosen == 'bf16' else 'not faster'} by the >= 10% rule"]
    assert made["key"]["flags"] == ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    assert predictor.describe()["precision"] == predictor.precision == chosen
    seen = []
    predictor.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    predictor.predict_proba(np.zeros((2, 3, 32, 32), np.uint8))
    assert seen == [{"bf16": torch.bfloat16, "fp32": torch.float32}[chosen]]


@pytest.mark.slow
def test_torch_compile_matches_eager(model_dir, reference):
    from vit_service.backends import load_backend

    predictor = load_backend(model_dir, backend="torch", device="cpu", compile_mode="default")
    predictor.warmup(max_batch_size=4)
    datas = [encode(picture(s), "JPEG") for s in (4, 5, 6)]
    probs = predictor.predict_proba(uint8_batch(predictor.preprocessing, *datas))
    np.testing.assert_allclose(probs, np.stack([reference(d) for d in datas]), atol=1e-4)
