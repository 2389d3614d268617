"""API keys (VIT_API_KEY, VIT_API_KEY_FILE): a real `bentoml serve` with keys set, called through
the curl binary, httpx and BentoML's own client (`token=`); the same service without keys stays
open and says so in its log. The key-reading rules are checked directly.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import bentoml
import httpx
import pytest

from service_fixtures import encode, picture
from vit_service.serving.auth import AuthConfig
from vit_service.serving.settings import Settings

# Three keys: two from VIT_API_KEY, one from VIT_API_KEY_FILE (see conftest.keyed_model_server).
from conftest import API_KEYS  # noqa: E402

JPEG = encode(picture(3), "JPEG")
WRONG = "not-the-key-0123456789"


@pytest.fixture(scope="module")
def keyed(keyed_model_server):
    return keyed_model_server  # (url, log path)


@pytest.fixture(scope="module")
def url(keyed) -> str:
    return keyed[0]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_401(r: httpx.Response, reason: str) -> None:
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error"} and reason in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")


# --------------------------------------------------------------------- with keys, over HTTP

def protected_routes() -> list[tuple[str, str]]:
    """Every route the service serves itself that is not open (read from the service, so a new
    route is covered without editing this list), plus BentoML's spec and metrics and an unknown path."""
    from vit_service.serving.auth import AuthConfig
    from vit_service.serving.http import served_routes
    from vit_service.serving.service import ViTClassifier, pages_app

    config = AuthConfig((b"key digest",), protect_metrics=True)
    ours = [(method, path) for path, methods in sorted(served_routes(ViTClassifier, pages_app).items())
            for method in sorted(methods) if not config.is_open(path)]
    return [*ours, ("GET", "/metrics"), ("GET", "/no/such/path")]


PROTECTED = protected_routes()


def test_the_protected_routes_are_read_from_the_service():
    assert {("POST", "/classify"), ("POST", "/classify_batch"), ("POST", "/explain"), ("GET", "/model_info"),
            ("POST", "/model_info"), ("GET", "/v2"), ("POST", "/v2/models/{name}/infer")} <= set(PROTECTED)
    assert not {("GET", "/"), ("GET", "/ui"), ("GET", "/docs"), ("GET", "/docs.json"), ("GET", "/v2/health/ready")} \
        & set(PROTECTED)  # open


@pytest.mark.parametrize("method,path", PROTECTED)
def test_every_model_route_needs_a_key(url, method, path):
    files = {"images" if path == "/classify_batch" else "image": ("a.jpg", JPEG, "image/jpeg")}
    kw = {"files": files} if path in ("/classify", "/classify_batch", "/explain") else {}
    assert_401(httpx.request(method, url + path, timeout=60, **kw), "missing API key")
    assert_401(httpx.request(method, url + path, headers=bearer(WRONG), timeout=60, **kw), "wrong API key")
    assert_401(httpx.request(method, url + path, headers={"Authorization": f"Basic {API_KEYS[0]}"}, timeout=60, **kw),
               "malformed")
    for key in API_KEYS:  # each key, from the variable or the file, opens it
        r = httpx.request(method, url + path, headers=bearer(key), timeout=60, **kw)
        if "{" in path:  # a route with parameters, asked literally: past the key, the route's own answer
            assert r.status_code in (400, 404) and "API key" not in r.text, (key[:5], r.status_code, r.text[:300])
        else:
            assert r.status_code == (404 if path == "/no/such/path" else 200), (key[:5], r.status_code, r.text[:300])


def test_wrong_key_gets_the_invalid_token_challenge(url):
    r = httpx.get(url + "/model_info", headers=bearer(WRONG))
    assert r.headers["www-authenticate"] == 'Bearer realm="vit-service", error="invalid_token"'
    r = httpx.get(url + "/model_info")
    assert r.headers["www-authenticate"] == 'Bearer realm="vit-service"'


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz", "/", "/ui", "/docs", "/static_content/swagger-ui.css"])
def test_probes_and_static_shells_stay_open(url, path):
    assert httpx.get(url + path).status_code == 200


def test_real_curl_with_and_without_the_key(url, tmp_path):
    image = tmp_path / "cat.jpg"
    image.write_bytes(JPEG)

    def curl(*args: str) -> tuple[str, str]:
        out = subprocess.run(["curl", "-sS", "-i", *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
        return head, body

    head, body = curl("-F", f"image=@{image}", f"{url}/classify")
    assert head.startswith("HTTP/1.1 401") and re.search(r"(?im)^www-authenticate: Bearer", head), head
    assert json.loads(body) == {"error": "missing API key: send the header `Authorization: Bearer <key>`"}
    head, body = curl("-H", f"Authorization: Bearer {API_KEYS[2]}", "-F", f"image=@{image}", f"{url}/classify")
    assert head.startswith("HTTP/1.1 200"), head
    assert len(json.loads(body)["predictions"]) == 4  # the tiny model's 4 classes (top 5 capped)


def test_bentoml_client_with_token(url, tmp_path):
    image = tmp_path / "cat.jpg"
    image.write_bytes(JPEG)
    with bentoml.SyncHTTPClient(url, token=API_KEYS[1]) as client:
        assert len(client.classify(image=image, top_k=2)["predictions"]) == 2
        assert client.model_info()["num_classes"] == 4
    # Without the token (or with a wrong one) the client still reads the API's schema, and its
    # first call fails with the 401 and the reason, not "Failed to fetch schema" and a 500.
    for token, reason in ((None, "missing API key"), (WRONG, "wrong API key")):
        with bentoml.SyncHTTPClient(url, token=token) as client:
            with pytest.raises(bentoml.exceptions.BentoMLException) as e:
                client.classify(image=image)
        assert int(e.value.error_code) == 401 and reason in str(e.value), (e.value.error_code, str(e.value))


def test_failed_attempts_are_counted_without_key_material(url, keyed):
    def failures(reason: str) -> float:
        text = httpx.get(url + "/metrics", headers=bearer(API_KEYS[0])).text
        found = re.findall(rf'vit_auth_failures_total\{{[^}}]*reason="{reason}"[^}}]*\}} (\S+)', text)
        return sum(float(v) for v in found)

    before = {r: failures(r) for r in ("missing", "invalid", "malformed")}
    httpx.get(url + "/model_info")
    httpx.get(url + "/model_info", headers=bearer(WRONG))
    httpx.get(url + "/model_info", headers=bearer(WRONG))
    httpx.get(url + "/model_info", headers={"Authorization": "Token abc"})
    assert failures("missing") == before["missing"] + 1
    assert failures("invalid") == before["invalid"] + 2
    assert failures("malformed") == before["malformed"] + 1
    text = httpx.get(url + "/metrics", headers=bearer(API_KEYS[0])).text
    log = keyed[1].read_text()
    for secret in (*API_KEYS, WRONG):
        assert secret not in text and secret not in log
    assert "API keys: on (3 keys)" in log


def test_without_keys_the_api_is_open(tiny_model_server):
    """(Its start-up log line saying so is checked in tests/test_error_shape.py.)"""
    url, _ = tiny_model_server
    assert httpx.get(url + "/model_info").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    r = httpx.post(url + "/classify", files={"image": ("a.jpg", JPEG, "image/jpeg")}, headers=bearer(WRONG))
    assert r.status_code == 200  # a key sent to an open service is ignored


# ------------------------------------------------------------------ reading the keys

def auth_config(env: dict[str, str]) -> AuthConfig:
    """As the service reads it: settings.py reads the variables, auth.py parses them."""
    return AuthConfig.from_settings(Settings.from_env({"VIT_DEVICE": "cpu", **env}))


def test_keys_from_the_variable_and_the_file(tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nfile-key-1\n\n  file-key-2  \n")
    config = auth_config({"VIT_API_KEY": "env-a, env-b", "VIT_API_KEY_FILE": str(keys)})
    assert config.enabled and len(config.digests) == 4 and not config.protect_metrics
    for key in ("env-a", "env-b", "file-key-1", "file-key-2"):
        assert config.check(f"Bearer {key}") is None
        assert config.check(f"bearer  {key} ") is None  # scheme case-insensitive (RFC 7235)
    assert config.check("Bearer file-key-") == "invalid"
    assert config.check("Bearer # rotated monthly") == "invalid"
    assert config.check(None) == "missing" and config.check("") == "missing"
    assert config.check("Basic env-a") == "malformed" and config.check("Bearer ") == "malformed"
    assert "env-a" not in repr(config) and "file-key" not in repr(config)


def test_auth_is_off_by_default_and_open_paths():
    config = auth_config({})
    assert not config.enabled
    keyed = auth_config({"VIT_API_KEY": "k1"})
    assert [p for p in ("/livez", "/readyz", "/healthz", "/metrics", "/", "/ui", "/docs", "/docs.json", "/schema.json")
            if not keyed.is_open(p)] == []
    assert [p for p in ("/classify", "/classify_batch", "/explain", "/model_info", "/x") if keyed.is_open(p)] == []
    assert not auth_config({"VIT_API_KEY": "k1", "VIT_PROTECT_METRICS": "1"}).is_open("/metrics")


@pytest.mark.parametrize("env,message", [
    ({"VIT_API_KEY": "a,,b"}, "VIT_API_KEY: an empty key"),
    ({"VIT_API_KEY": "has space"}, "VIT_API_KEY key #1: an API key must be printable ASCII"),
    ({"VIT_API_KEY_FILE": "/nonexistent/keys"}, "VIT_API_KEY_FILE /nonexistent/keys: cannot read it"),
    ({"VIT_PROTECT_METRICS": "maybe"}, "VIT_PROTECT_METRICS must be 1 or 0"),
])
def test_bad_key_settings_are_start_up_errors(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        auth_config(env)


def test_empty_key_file_is_an_error_not_an_open_api(tmp_path: Path):
    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        auth_config({"VIT_API_KEY_FILE": str(empty)})
    bad = tmp_path / "bad"
    bad.write_text("good-key\nsecret with space\n")
    with pytest.raises(ValueError) as e:
        auth_config({"VIT_API_KEY_FILE": str(bad)})
    assert "line 2" in str(e.value) and "secret" not in str(e.value)
