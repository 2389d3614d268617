"""Fuzzed uploads through the real service, from bytes to JSON (hypothesis).

A real `bentoml serve` (the tiny model, small limits, one worker) gets generated requests on raw
sockets, so the framing itself can be wrong: random bytes and valid JPEG/PNG/WebP/GIF/TIFF/BMP
files bit-flipped, truncated, spliced, or with huge declared dimensions; wrong field names,
duplicate and empty parts, no filename, odd part headers; multipart without or with the wrong
boundary, unterminated, LF-only; other content types; Content-Length over the limit, shorter or
longer than the body. /classify, /classify_batch, /explain and the Open Inference Protocol's
/v2/models/NAME/infer (binary tensor extension, its JSON header mutated too).

The properties, for every request: never a 5xx; a 200 is the route's JSON; anything else is a
4xx `{"error": "<text>"}` (errors.py's shape). After each request a real JPEG is classified with
the model's own answer (the independent `reference` decoder); over the whole run the worker stays
the same process and its memory stays bounded (VmRSS / VmHWM from /proc).

The fast set runs a fixed-seed 150 examples; `make fuzz` runs FUZZ_EXAMPLES (5,000) with a random
seed, which hypothesis prints with any failure so it can be replayed (`--hypothesis-seed`).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import zlib
from urllib.parse import quote, urlparse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.local_server import server_processes
from service_fixtures import CLASS_NAMES, MODEL_NAME, assert_matches, bentoml_server, check_predictions, encode, picture
from service_fixtures import reference, store  # noqa: F401  (session fixtures)

MAX_BODY = 256 * 1024
MAX_IMAGES = 3
MAX_PIXELS = 2_000_000  # decoded images stay small, so the memory bound below can be tight-ish
SERVER_ENV = {"VIT_PRECISION": "fp32", "VIT_MAX_BODY_BYTES": str(MAX_BODY), "VIT_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
              "VIT_MAX_IMAGE_PIXELS": str(MAX_PIXELS), "VIT_TIMEOUT": "20", "VIT_WORKERS": "1", "VIT_MODE": "inprocess"}
REPLY_TIMEOUT_S = 30  # longer than VIT_TIMEOUT: no answer by then is a hang
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))  # `make fuzz`; 0: the fast seeded run
# The worker after the run, against before it. Pillow and glibc keep some of what a decode took,
# so the bounds are generous: what they catch is a leak per request or an unbounded decode.
MAX_RSS_GROWTH_MIB = 200
MAX_PEAK_GROWTH_MIB = 400

GOOD_JPEG = encode(picture(5), "JPEG")
UPLOAD_ROUTES = {"/classify": "image", "/classify_batch": "images", "/explain": "image"}
OPTIONS = ("top_k", "method", "class_name", "format")


# ----------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def server(store, tmp_path_factory: pytest.TempPathFactory):
    home, _ = store
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    with bentoml_server(home, log, env=SERVER_ENV) as url:
        yield url
    text = log.read_text()
    assert "Traceback" not in text and "status=500" not in text, text[-4000:]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the peak resident) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


# -------------------------------------------------------------------------- the requests

def valid_images() -> dict[str, bytes]:
    """Small valid files of every format the service takes (a fuzz seed each)."""
    rgb = picture(11, (40, 32))
    images = {"jpeg": encode(rgb, "JPEG"), "jpeg_progressive": encode(rgb, "JPEG", progressive=True),
              "png": encode(rgb, "PNG"), "png_palette": encode(rgb.convert("P"), "PNG"),
              "gif": encode(rgb.convert("P"), "GIF"), "tiff": encode(rgb, "TIFF"),
              "tiff_lzw": encode(rgb, "TIFF", compression="tiff_lzw"), "bmp": encode(rgb, "BMP"),
              "webp": encode(rgb, "WEBP")}
    return images


VALID = valid_images()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declare_size(data: bytes, fmt: str, width: int, height: int) -> bytes:
    """The file with its header declaring width x height (checksums kept valid)."""
    out = bytearray(data)
    if fmt.startswith("png"):  # IHDR right after the signature; its CRC recomputed
        ihdr = struct.pack(">II", width % 2**32, height % 2**32) + bytes(out[24:29])
        return bytes(out[:8]) + png_chunk(b"IHDR", ihdr) + bytes(out[33:])
    if fmt == "gif":  # the logical screen
        out[6:10] = struct.pack("<HH", width % 2**16, height % 2**16)
    elif fmt == "bmp":  # BITMAPINFOHEADER (a negative height is top-down)
        out[18:26] = struct.pack("<ii", width % 2**31, (height % 2**32) - 2**31)
    elif fmt.startswith("jpeg"):  # the first SOFn frame header
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = out.find(marker)
            if at >= 0:
                out[at + 5:at + 9] = struct.pack(">HH", height % 2**16, width % 2**16)
                break
    return bytes(out)


@st.composite
def image_bytes(draw) -> bytes:
    """Random bytes, or a valid image as it is or damaged: bits flipped, bytes overwritten near
    the header, cut short, spliced with another format, or declaring a huge size."""
    kind = draw(st.sampled_from(["random", "valid", "valid", "valid", "flips", "flips", "header", "truncated",
                                 "spliced", "declared", "empty"]))
    if kind == "random":
        return draw(st.binary(max_size=2048))
    if kind == "empty":
        return b""
    fmt = draw(st.sampled_from(sorted(VALID)))
    data = VALID[fmt]
    if kind == "valid":
        return data
    if kind == "flips":
        out = bytearray(data)
        for at, bit in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)), min_size=1,
                                     max_size=8)):
            out[at] ^= 1 << bit
        return bytes(out)
    if kind == "header":
        at = draw(st.integers(0, min(64, len(data) - 1)))
        patch = draw(st.binary(min_size=1, max_size=16))
        return data[:at] + patch + data[at + len(patch):]
    if kind == "truncated":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "spliced":
        other = VALID[draw(st.sampled_from(sorted(VALID)))]
        return data[:draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))):]
    big = st.one_of(st.integers(0, 70_000), st.integers(0, 2**32 - 1))
    return declare_size(data, fmt, draw(big), draw(big))


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
# What can be wrong with an upload besides its bytes; each request gets up to two of these, so
# most requests are nearly right and reach the check (or the model) they are aimed at.
FAULTS = ["field_name", "no_filename", "odd_filename", "part_type", "no_disposition", "duplicate_part", "empty_part",
          "options", "unterminated", "lf_only", "preamble", "empty_body", "query_top_k",
          "type_no_boundary", "type_wrong_boundary", "type_urlencoded", "type_json", "type_image", "type_text",
          "type_none", "type_mixed", "length_over_limit", "length_short", "length_long_half_close", "length_absent",
          "length_chunked"]


def part(name: bytes, filename: str | None, ctype: str | None, data: bytes, disposition: bool = True) -> bytes:
    head = b""
    if disposition:
        head += b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            head += b'; filename="' + filename.encode() + b'"'
        head += b"\r\n"
    if ctype is not None:
        head += b"Content-Type: " + ctype.encode() + b"\r\n"
    return head + b"\r\n" + data


@st.composite
def upload_requests(draw) -> dict:
    """A request to one of the upload routes: its images (image_bytes) in a multipart form with
    up to two faults (FAULTS) in the form, its framing, its content type or its told length."""
    path = draw(st.sampled_from(sorted(UPLOAD_ROUTES)))
    field = UPLOAD_ROUTES[path]
    faults = draw(st.sets(st.sampled_from(FAULTS), max_size=2))
    images = draw(st.lists(image_bytes(), min_size=1, max_size=MAX_IMAGES + 1 if path == "/classify_batch" else 1))
    if "duplicate_part" in faults:
        images.append(draw(image_bytes()))
    if "empty_part" in faults:
        images.insert(draw(st.integers(0, len(images))), b"")
    parts = []
    for data in images:
        name = draw(st.sampled_from(["file", "images" if field == "image" else "image", "", "IMAGE"]) | TEXT) \
            if "field_name" in faults else field
        filename = None if "no_filename" in faults else (
            draw(st.sampled_from(["", "x" * 300, "a\0b.jpg", 'q"uote.jpg', "ü.webp", "../../etc/passwd"]) | TEXT)
            if "odd_filename" in faults else "photo.jpg")
        ctype = draw(st.sampled_from([None, "text/plain", "multipart/form-data", "image/png"]) | TEXT) \
            if "part_type" in faults else "image/jpeg"
        parts.append(part(name.encode(), filename, ctype, data, disposition="no_disposition" not in faults))
    if "options" in faults:
        for option in draw(st.lists(st.sampled_from([*OPTIONS, "other"]), min_size=1, max_size=3)):
            value = draw(st.sampled_from(["3", "0", "-1", "99999999999999999999", "null", '"2"', "", "png", "grad",
                                          *CLASS_NAMES]) | TEXT)
            parts.append(part(option.encode(), None, None, value.encode()))
        parts = draw(st.permutations(parts))
    boundary = b"fuzz" + draw(st.binary(max_size=8)).hex().encode()
    nl = b"\n" if "lf_only" in faults else b"\r\n"
    body = b"".join(b"--" + boundary + nl + p.replace(b"\r\n", nl) + nl for p in parts)
    if "unterminated" not in faults:
        body += b"--" + boundary + b"--" + nl
    if "preamble" in faults:
        body = draw(st.binary(max_size=64)) + nl + body
    if "empty_body" in faults:
        body = b""
    ctype = b"multipart/form-data; boundary=" + boundary
    kind = next((f for f in faults if f.startswith("type_")), None)
    if kind is not None:
        ctype = {"type_no_boundary": b"multipart/form-data", "type_wrong_boundary": b"multipart/form-data; boundary=x",
                 "type_urlencoded": b"application/x-www-form-urlencoded", "type_json": b"application/json",
                 "type_image": b"image/jpeg", "type_text": b"text/plain", "type_none": None,
                 "type_mixed": b"multipart/mixed; boundary=" + boundary}[kind]
    if kind == "type_urlencoded" and draw(st.booleans()):
        body = field.encode() + b"=" + quote(images[0]).encode() + b"&top_k=2"
    if kind == "type_image":
        body = images[0]
    query = "?top_k=" + quote(draw(st.sampled_from(["2", "", "0", "x"]) | TEXT)) if "query_top_k" in faults else ""
    length = next((f.removeprefix("length_") for f in faults if f.startswith("length_")), "true")
    return {"path": path + query, "content_type": ctype, "body": body, "length": length, "route": path,
            "faults": sorted(faults)}


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=8), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=6)
INFER_FIELDS = ["inputs", "inputs.0", "inputs.0.name", "inputs.0.datatype", "inputs.0.shape", "inputs.0.parameters",
                "inputs.0.parameters.binary_data_size", "inputs.0.data", "outputs", "outputs.0",
                "outputs.0.parameters", "parameters", "parameters.top_k", "parameters.binary_data_output", "id"]


def set_at(doc: dict, path: str, value) -> None:
    """doc at the dotted path (list items by index) = value, if an earlier change left that path."""
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = child(node, key)
    if isinstance(node, dict) and not last.isdigit():
        node[last] = value
    elif isinstance(node, list) and last.isdigit() and node:
        node[int(last) % len(node)] = value


def child(node, key: str):
    if isinstance(node, dict) and not key.isdigit():
        return node.get(key)
    if isinstance(node, list) and key.isdigit() and node:
        return node[int(key) % len(node)]
    return None


@st.composite
def infer_requests(draw) -> dict:
    """An Open Inference Protocol request: encoded images as a BYTES tensor in the binary
    extension, its JSON header and Inference-Header-Content-Length sometimes wrong."""
    images = draw(st.lists(image_bytes(), min_size=1, max_size=MAX_IMAGES + 1))
    raw = b"".join(struct.pack("<I", len(i)) + i for i in images)
    head = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "labels", "parameters": {"binary_data": draw(st.booleans())}}],
            "parameters": {"top_k": 2}}
    changed = draw(st.lists(st.sampled_from(INFER_FIELDS), max_size=2))
    for path in changed:
        set_at(head, path, draw(JSON_VALUES))
    text = json.dumps(head).encode()
    if draw(st.integers(0, 9)) == 0:
        text = text[:draw(st.integers(0, len(text)))]  # JSON cut short
    body = text + raw
    header_length = str(len(text))
    if draw(st.integers(0, 4)) == 0:
        header_length = draw(st.integers(-5, len(body) + 5).map(str)
                             | st.sampled_from(["", "x", "1e3", "99999999999999999999999"]) | st.none())
    version, name = "", MODEL_NAME
    if draw(st.integers(0, 9)) == 0:
        version, name = draw(st.sampled_from([("/versions/no-such", MODEL_NAME), ("", "other")]))
    extra = [(b"Inference-Header-Content-Length", header_length.encode())] if header_length is not None else []
    return {"path": f"/v2/models/{name}{version}/infer", "content_type": b"application/octet-stream", "body": body,
            "length": draw(st.sampled_from(["true"] * 8 + ["short", "over_limit"])), "route": "infer",
            "headers": extra, "faults": changed}


# ------------------------------------------------------------------------ sending, checking

def send(url: str, request: dict) -> tuple[int | None, dict[str, str], bytes]:
    """Sends the request on a raw socket with its length told as drawn; returns (status, headers,
    body), status None when the server closed without an answer."""
    parsed = urlparse(url)
    body, length = request["body"], request["length"]
    headers = [(b"Host", parsed.netloc.encode()), (b"Connection", b"close"), *request.get("headers", [])]
    if request["content_type"] is not None:
        headers.append((b"Content-Type", request["content_type"]))
    declared = {"true": len(body), "over_limit": MAX_BODY + 1 + len(body) * 1000, "short": max(0, len(body) - 7),
                "long_half_close": len(body) + 100, "absent": None, "chunked": None}[length]
    if declared is not None:
        headers.append((b"Content-Length", str(declared).encode()))
    if length == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:500], body[500:]) if c) + b"0\r\n\r\n"
    elif length == "absent":
        body = b""
    head = b"POST " + request["path"].encode() + b" HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=REPLY_TIMEOUT_S) as sock:
        try:
            sock.sendall(head + b"\r\n" + body)
            if length == "long_half_close":
                sock.shutdown(socket.SHUT_WR)  # the body ends before its declared length
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (and closed) before reading it all: the answer is still there to read
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int | None, dict[str, str], bytes]:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        if b"\r\n\r\n" not in data:
            assert not data, f"a partial answer: {data[:300]!r}"
            return None, {}, b""
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        assert "content-length" in headers, lines
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            assert chunk, f"the answer ended early: {head!r}"
            body += chunk
    except socket.timeout:
        raise AssertionError(f"no answer in {REPLY_TIMEOUT_S} s: the server hangs") from None
    return int(lines[0].split()[1]), headers, body


def check_answer(request: dict, status: int | None, headers: dict[str, str], body: bytes) -> None:
    if status is None:  # only a client that stopped sending may get no answer
        assert request["length"] == "long_half_close", "the connection closed without an answer"
        return
    assert status < 500, (status, body[:500])
    if status >= 400:
        assert status >= 400 and headers.get("content-type") == "application/json", (status, headers, body[:300])
        error = json.loads(body)
        assert isinstance(error, dict) and set(error) == {"error"}, error
        assert isinstance(error["error"], str) and error["error"].strip(), error
        return
    assert status == 200, (status, body[:300])
    route = request["route"]
    if route == "infer":
        size = int(headers.get("inference-header-content-length", len(body)))
        answer = json.loads(body[:size])
        assert answer["model_name"] == MODEL_NAME and answer["outputs"], answer
        return
    if headers.get("content-type") == "image/png":  # /explain format=png
        assert route == "/explain" and body.startswith(b"\x89PNG\r\n\x1a\n")
        return
    answer = json.loads(body)
    results = answer["results"] if route == "/classify_batch" else [answer]
    assert 1 <= len(results) <= MAX_IMAGES
    for result in results:
        preds = result["predictions"]
        check_predictions(preds, len(preds))
    if route == "/explain":
        assert answer["explained_class"] in CLASS_NAMES and len(answer["grid"]) == answer["grid_shape"][0]


def fuzz_settings():
    if FUZZ_EXAMPLES:
        return settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False,
                        suppress_health_check=list(HealthCheck))
    return settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def test_fuzzed_uploads_are_4xx_json_and_the_server_keeps_serving(server, reference):
    url = server
    _, workers = server_processes(url)
    assert len(workers) == 1
    worker = workers[0]
    with httpx.Client(base_url=url, timeout=60) as client:
        def good_request_answered() -> None:
            r = client.post("/classify", files={"image": ("good.jpg", GOOD_JPEG, "image/jpeg")})
            assert r.status_code == 200, r.text
            assert_matches(r.json()["predictions"], reference(GOOD_JPEG))

        for image in VALID.values():  # every decoder loaded before the memory baseline
            assert client.post("/explain", files={"image": ("a", image, "")}).status_code == 200
        good_request_answered()
        before = memory_kib(worker.pid)
        seen: dict[tuple[str, int | None], int] = {}

        @fuzz_settings()
        @given(request=st.one_of(upload_requests(), upload_requests(), infer_requests()))
        def one(request: dict) -> None:
            status, headers, body = send(url, request)
            check_answer(request, status, headers, body)
            key = (request["route"], status)
            seen[key] = seen.get(key, 0) + 1
            good_request_answered()

        one()
    after = memory_kib(worker.pid)
    assert [w.pid for w in server_processes(url)[1]] == [worker.pid], "the worker was replaced (it crashed)"
    print("fuzz answers (route, status): count", dict(sorted(seen.items(), key=str)))
    print(f"worker memory: VmRSS {before['VmRSS'] / 1024:.0f} -> {after['VmRSS'] / 1024:.0f} MiB, "
          f"peak {after['VmHWM'] / 1024:.0f} MiB")
    assert (after["VmRSS"] - before["VmRSS"]) / 1024 < MAX_RSS_GROWTH_MIB, (before, after)
    assert (after["VmHWM"] - before["VmRSS"]) / 1024 < MAX_PEAK_GROWTH_MIB, (before, after)
    statuses = {s for _, s in seen}
    assert 200 in statuses and 400 in statuses, seen  # the run reached both the model and the checks
