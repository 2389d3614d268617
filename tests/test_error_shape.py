"""One error shape: every non-2xx answer is `{"error": "<non-empty text>"}` JSON with a matching
status, BentoML's own 404/405 included, against a real `bentoml serve` (tiny model, small limits).
The 401 answers are in tests/test_auth.py, the 503 while a worker warms up in tests/test_faults.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
from urllib.parse import urlparse

import httpx
import pytest

from service_fixtures import bentoml_server, encode, picture, poll, read_http_response
from service_fixtures import store  # noqa: F401  (session fixture)

MAX_BODY = 200_000
MAX_IMAGES = 3
TIMEOUT_S = 6
MAX_CONCURRENCY = 6
SERVER_ENV = {"VIT_PRECISION": "fp32", "VIT_MAX_BODY_BYTES": str(MAX_BODY), "VIT_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
              "VIT_TIMEOUT": str(TIMEOUT_S), "VIT_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
              "VIT_WORKERS": "1"}  # one front: the concurrency limit is per worker
PNG = encode(picture(1), "PNG")


@pytest.fixture(scope="module")
def server(store, tmp_path_factory: pytest.TempPathFactory):
    home, _ = store
    log = tmp_path_factory.mktemp("error_shape") / "serve.log"
    with bentoml_server(home, log, env=SERVER_ENV) as url:
        yield url, log
    text = log.read_text()
    assert "Traceback" not in text and "status=500" not in text, text[-4000:]


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


def assert_error_shape(r: httpx.Response, status: int, fragment: str = "") -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"].strip(), body
    assert fragment in body["error"], (fragment, body)
    assert int(r.headers["content-length"]) == len(r.content)


BIG = b"\xff" * (MAX_BODY + 1)
# (what, method, path, httpx keyword arguments, status, a fragment of the message)
CASES = [
    ("unknown path", "GET", "/no/such/path", {}, 404, "no such path"),
    ("unknown path, POST", "POST", "/predict", {"files": {"image": ("a.png", PNG, "image/png")}}, 404, "no such path"),
    ("unknown path under a route", "GET", "/classify/extra", {}, 404, "no such path"),
    ("wrong method on a model route", "GET", "/classify", {}, 405, "Method Not Allowed"),
    ("wrong method on /model_info", "PUT", "/model_info", {}, 405, "method PUT is not allowed on /model_info"),
    ("wrong method on a probe", "POST", "/readyz", {}, 405, "not allowed"),
    ("wrong method on the page", "DELETE", "/ui", {}, 405, "not allowed"),
    ("bad content type", "POST", "/classify", {"json": {"image": "cat.jpg"}}, 415, "multipart/form-data"),
    ("oversize body", "POST", "/classify", {"files": {"image": ("big.png", BIG, "image/png")}}, 413, "limit"),
    ("oversize body, another route", "POST", "/model_info", {"content": BIG}, 413, "limit"),
    ("too many images", "POST", "/classify_batch",
     {"files": [("images", (f"{i}.png", PNG, "image/png")) for i in range(MAX_IMAGES + 1)]}, 413, "too many images"),
    ("not an image", "POST", "/classify", {"files": {"image": ("a.txt", b"hello", "text/plain")}}, 400, "a.txt"),
    ("missing field", "POST", "/classify", {"files": {"file": ("a.png", PNG, "image/png")}}, 400, "'image'"),
    ("bad top_k", "POST", "/classify", {"files": {"image": ("a.png", PNG, "image/png")}, "data": {"top_k": "x"}}, 400,
     "top_k"),
]


@pytest.mark.parametrize("what,method,path,kw,status,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_json_error(url, what, method, path, kw, status, fragment):
    assert_error_shape(httpx.request(method, url + path, timeout=60, **kw), status, fragment)


def test_head_to_an_unknown_path_declares_json(url):
    r = httpx.head(url + "/no/such/path")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json" and r.content == b""


def test_405_keeps_its_allow_header(url):
    r = httpx.request("PATCH", url + "/readyz")
    assert_error_shape(r, 405, "method PATCH is not allowed on /readyz")
    assert "GET" in r.headers["allow"] and r.headers["allow"] in r.json()["error"]


def test_unknown_path_through_curl(url):
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code} %{content_type}", f"{url}/favicon.ico"],
                         capture_output=True, text=True, timeout=60)
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "404 application/json" and json.loads(body) == {
        "error": "no such path (the API is described at /docs)"}


def test_overload_429_and_timeout_504_are_json(url):
    """Slow uploads (headers sent, body never finished) hold every concurrency slot: the next
    request is refused with 429 at once, and a held one is answered 504 when the timeout fires."""
    host, port = urlparse(url).hostname, urlparse(url).port
    head = (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            f"Content-Length: 1000\r\n\r\n--zz\r\n").encode()
    holders = []
    try:
        for _ in range(MAX_CONCURRENCY):
            s = socket.create_connection((host, port), timeout=TIMEOUT_S + 20)
            s.sendall(head)
            holders.append(s)
        r = poll(lambda: httpx.post(f"{url}/classify", files={"image": ("a.png", PNG, "image/png")}, timeout=30),
                 until=lambda r: r.status_code != 200)
        assert_error_shape(r, 429, "Too many requests")
        status_line, body = read_http_response(holders[0])  # blocks until the timeout fires
        assert status_line.startswith("HTTP/1.1 504"), status_line
        assert json.loads(body) == {"error": f"Not able to process the request in {TIMEOUT_S} seconds"}
    finally:
        for s in holders:
            s.close()
    r = poll(lambda: httpx.post(f"{url}/classify", files={"image": ("a.png", PNG, "image/png")}, timeout=30),
             until=lambda r: r.status_code == 200)
    assert r.status_code == 200


def test_good_answers_pass_untouched(url, server):
    r = httpx.post(url + "/classify", files={"image": ("a.png", PNG, "image/png")})
    assert r.status_code == 200 and set(r.json()) == {"predictions"} and "server-timing" in r.headers
    assert httpx.get(url + "/metrics").headers["content-type"].startswith("text/plain")
    assert httpx.get(url + "/ui").headers["content-type"].startswith("text/html")
    # Authentication is off by default, and the start-up log says the API is open.
    assert "API keys: off: the API is open to anyone who can reach this port" in server[1].read_text()


def test_other_error_bodies_are_reshaped():
    """What the frameworks answer around our code keeps its status and gets our shape: BentoML's
    JSON with an "error" text (POST /model_info with body `{`; not sent to the server above
    because BentoML also logs a traceback for it, which the server fixture forbids), plain text,
    HTML."""
    from vit_service.serving.errors import shaped_message

    body = (b'{"error":"1 validation error for Input","detail":[{"type":"json_invalid","loc":[],'
            b'"msg":"Invalid JSON: EOF while parsing an object at line 1 column 1","url":"https://errors.pydantic.dev"}]}')
    assert shaped_message(400, "application/json", body, {}, None) == "1 validation error for Input"
    assert shaped_message(400, "application/json", b'{"error": "fine"}', {}, None) is None
    assert shaped_message(500, "text/plain", b"Internal Server Error", {}, None) == "internal error; see the server log"
    assert shaped_message(502, "text/html", b"<html>Bad gateway</html>", {}, None) == "Bad Gateway"
    assert shaped_message(404, "text/plain", b"Not Found", {}, None) == "no such path (the API is described at /docs)"
    assert shaped_message(405, "text/plain", b"Method Not Allowed", {"method": "PUT", "path": "/x"}, "GET") == \
        "method PUT is not allowed on /x; use GET"
