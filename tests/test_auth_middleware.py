"""AuthMiddleware in-process: a real Starlette app behind it, driven through httpx's ASGI transport.

The served checks (test_auth.py) go through `bentoml serve`; these reach every branch of auth.py
in one process, so a change to it fails here too (and mutation testing sees them).
"""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from vit_service.serving.auth import (MESSAGES, METRICS_PATH, PROBE_PATHS, PUBLIC_PAGES, AuthConfig, AuthMiddleware,
                                      read_key_list)

KEYS = ("k-one", "k-two")


def _config(protect_metrics: bool = False, keys: tuple[str, ...] = KEYS) -> AuthConfig:
    return AuthConfig(read_key_list("VIT_API_KEY", ",".join(keys)), protect_metrics)


def _app() -> Starlette:
    async def hello(request):
        return PlainTextResponse(f"hello {request.url.path}")

    return Starlette(routes=[Route("/{path:path}", hello, methods=["GET", "POST"])])


async def _get(config: AuthConfig, path: str, headers: dict[str, str] | None = None,
               failures: list[str] | None = None) -> httpx.Response:
    on_failure = failures.append if failures is not None else None
    transport = httpx.ASGITransport(app=AuthMiddleware(_app(), config, on_failure))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers or {})


@pytest.mark.anyio
@pytest.mark.parametrize("header, reason, challenge", [
    (None, "missing", 'Bearer realm="vit-service"'),
    ("", "missing", 'Bearer realm="vit-service"'),
    ("Basic k-one", "malformed", 'Bearer realm="vit-service"'),
    ("Bearer", "malformed", 'Bearer realm="vit-service"'),
    ("Bearer    ", "malformed", 'Bearer realm="vit-service"'),
    ("Bearer k-three", "invalid", 'Bearer realm="vit-service", error="invalid_token"'),
    ("Bearer k-on", "invalid", 'Bearer realm="vit-service", error="invalid_token"'),
])
async def test_a_request_without_an_accepted_key_is_a_401_naming_why(header, reason, challenge) -> None:
    failures: list[str] = []
    answer = await _get(_config(), "/classify", {"authorization": header} if header is not None else {}, failures)
    assert answer.status_code == 401
    assert answer.json() == {"error": MESSAGES[reason]}
    assert answer.headers["www-authenticate"] == challenge
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["content-length"] == str(len(answer.content))
    assert failures == [reason]


@pytest.mark.anyio
@pytest.mark.parametrize("header", ["Bearer k-one", "Bearer k-two", "bearer k-one", "BEARER  k-two ", " Bearer k-one"])
async def test_every_configured_key_is_accepted_in_any_scheme_case(header) -> None:
    failures: list[str] = []
    answer = await _get(_config(), "/classify", {"Authorization": header}, failures)
    assert answer.status_code == 200 and answer.text == "hello /classify"
    assert failures == []


@pytest.mark.anyio
async def test_open_paths_need_no_key_and_metrics_only_unless_protected() -> None:
    for path in sorted(PROBE_PATHS | PUBLIC_PAGES) + ["/static_content/x.js", "/assets/a.css"]:
        assert (await _get(_config(), path)).status_code == 200, path
    assert (await _get(_config(), METRICS_PATH)).status_code == 200
    assert (await _get(_config(protect_metrics=True), METRICS_PATH)).status_code == 401
    assert (await _get(_config(protect_metrics=True), METRICS_PATH, {"authorization": "Bearer k-two"})).status_code == 200
    for path in ("/model_info", "/v2/models/m/infer", "/static_contentx", "/docs/x", "/metricsx"):
        assert (await _get(_config(), path)).status_code == 401, path


@pytest.mark.anyio
async def test_without_keys_everything_passes_and_other_scopes_pass_through() -> None:
    assert (await _get(AuthConfig(), "/classify")).status_code == 200
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    await AuthMiddleware(app, _config())({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]


@pytest.mark.anyio
async def test_the_first_authorization_header_counts() -> None:
    transport = httpx.ASGITransport(app=AuthMiddleware(_app(), _config()))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first_good = await client.get("/x", headers=[("Authorization", "Bearer k-one"), ("Authorization", "Bearer no")])
        first_bad = await client.get("/x", headers=[("Authorization", "Bearer no"), ("Authorization", "Bearer k-one")])
    assert (first_good.status_code, first_bad.status_code) == (200, 401)


def test_check_compares_digests_of_every_key() -> None:
    config = _config()
    assert config.digests == tuple(hashlib.sha256(k.encode()).digest() for k in KEYS)
    assert config.check("Bearer k-two") is None and config.check("Bearer k-one") is None
    assert config.check("Bearer K-ONE") == "invalid"  # keys are case-sensitive; the scheme is not
    assert config.check(None) == "missing"


def test_startup_message_says_what_is_open() -> None:
    assert AuthConfig().startup_message().startswith("API keys: off: the API is open")
    one = _config(keys=("solo",)).startup_message()
    assert one.startswith("API keys: on (1 key); open without a key: /healthz, /livez, /readyz,")
    assert one.endswith(", /metrics, the page, the docs and the API's spec")
    assert "solo" not in one
    two = _config(protect_metrics=True).startup_message()
    assert two.startswith("API keys: on (2 keys); ") and "/metrics" not in two
    assert "k-one" not in repr(_config())  # nor the keys in the repr


@pytest.mark.anyio
async def test_the_app_behind_gets_the_request_body_and_the_same_send() -> None:
    async def echo(request):
        return PlainTextResponse((await request.body()).decode())

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/", echo, methods=["POST"])])
    transport = httpx.ASGITransport(app=AuthMiddleware(app, _config()))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        answer = await client.post("/echo", content=b"payload", headers={"authorization": "Bearer k-one"})
        open_answer = await client.post("/", content=b"open page")  # an open path: no key needed
    assert answer.status_code == 200 and answer.text == "payload"
    assert open_answer.status_code == 200 and open_answer.text == "open page"


@pytest.mark.anyio
async def test_the_401_is_sent_as_lowercase_asgi_headers_and_a_scope_without_headers_is_missing() -> None:
    sent: list[dict] = []
    failures: list[str] = []

    async def send(message):
        sent.append(message)

    await AuthMiddleware(_app(), _config(), failures.append)({"type": "http", "path": "/classify"}, None, send)
    start, body = sent
    assert start["status"] == 401 and json.loads(body["body"]) == {"error": MESSAGES["missing"]}
    assert [name for name, _ in start["headers"]] == [b"content-type", b"content-length", b"www-authenticate"]
    assert failures == ["missing"]


def test_keys_must_be_printable_ascii_without_spaces_or_commas(tmp_path) -> None:
    from vit_service.serving.auth import read_key_file

    for bad in ("caf\xe9", "tab\there", "two words"):
        with pytest.raises(ValueError, match=r"^VIT_API_KEY key #2: an API key must be printable ASCII"):
            read_key_list("VIT_API_KEY", f"ok,{bad}")
    keys = tmp_path / "keys"
    keys.write_text("# ours\n\nfirst\n a,b \n")
    with pytest.raises(ValueError, match=rf"^VIT_API_KEY_FILE {keys} line 4: an API key must be printable ASCII"):
        read_key_file("VIT_API_KEY_FILE", str(keys))
    keys.write_bytes(b"\xffkey\n")
    with pytest.raises(ValueError, match=rf"^VIT_API_KEY_FILE {keys}: cannot read it \(UnicodeDecodeError: invalid start byte\)$"):
        read_key_file("VIT_API_KEY_FILE", str(keys))
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=rf"^VIT_API_KEY_FILE {missing}: cannot read it \(FileNotFoundError: No such file or directory\)$"):
        read_key_file("VIT_API_KEY_FILE", str(missing))


def test_the_off_message_says_how_to_turn_keys_on() -> None:
    assert AuthConfig().startup_message() == (
        "API keys: off: the API is open to anyone who can reach this port "
        "(set VIT_API_KEY or VIT_API_KEY_FILE to require `Authorization: Bearer <key>`)")
