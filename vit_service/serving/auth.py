"""API keys: with `VIT_API_KEY` or `VIT_API_KEY_FILE` set, every request needs `Authorization: Bearer <key>`.

Both may be set; their keys add up (settings.py reads them, with the parsing here). Which routes
stay open without a key, and how clients send it: docs/serving.md, "API keys". Keys are compared
as SHA-256 digests with `hmac.compare_digest`, against every configured key (no early exit, no
length leak), and never logged or put in a metric label; failures are counted by reason
(`missing`, `malformed`, `invalid`: the keys of MESSAGES) through `on_failure`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from vit_service.serving.errors import error_body

logger = logging.getLogger("bentoml.vit_service.auth")

PROBE_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/v2/health/live", "/v2/health/ready"})
PUBLIC_PAGES = frozenset({"/", "/ui", "/docs", "/docs.json", "/schema.json"})  # shells and the API's shape: no model data
PUBLIC_PREFIXES = ("/static_content/", "/assets/")  # BentoML's bundled Swagger UI / index assets
METRICS_PATH = "/metrics"
REALM = "vit-service"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _check_key(key: str, where: str) -> str:
    # RFC 6750 tokens are visible ASCII; a space or comma could not travel in the header or the list.
    if not key.isascii() or not key.isprintable() or " " in key or "," in key:
        raise ValueError(f"{where}: an API key must be printable ASCII without spaces or commas")
    return key


def read_key_list(name: str, raw: str, host: Any = None) -> tuple[bytes, ...]:
    """VIT_API_KEY: comma-separated keys -> their digests. An empty item is an error naming the
    variable (a typo must not leave a key out), never the key."""
    if not raw:
        return ()
    given = [k.strip() for k in raw.split(",")]
    if not all(given):
        raise ValueError(f"{name}: an empty key in the comma-separated list")
    return tuple(_digest(_check_key(k, f"{name} key #{i + 1}")) for i, k in enumerate(given))


def read_key_file(name: str, raw: str, host: Any = None) -> tuple[bytes, ...]:
    """VIT_API_KEY_FILE: a file of keys, one a line (blank lines and `#` comments skipped) -> their
    digests. A file that cannot be read or holds no key is an error (a set variable that yields no
    key must not leave the API open), naming the file and the line, never the key."""
    if not raw:
        return ()
    try:
        lines = Path(raw).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{name} {raw}: cannot read it ({type(e).__name__}: {e.args[-1]})") from None
    found = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.strip().startswith("#")]
    if not found:
        raise ValueError(f"{name} {raw}: holds no key (one key a line)")
    return tuple(_digest(_check_key(k, f"{name} {raw} line {n}")) for n, k in found)


@dataclass(frozen=True)
class AuthConfig:
    """The accepted keys (as digests only) and whether /metrics needs one too."""

    digests: tuple[bytes, ...] = field(default=(), repr=False)
    protect_metrics: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    @classmethod
    def from_settings(cls, settings: Any) -> AuthConfig:
        """From the service's Settings (VIT_API_KEY, VIT_API_KEY_FILE, VIT_PROTECT_METRICS)."""
        return cls(tuple(dict.fromkeys(settings.api_keys + settings.api_key_file_keys)), settings.protect_metrics)

    def is_open(self, path: str) -> bool:
        """Whether `path` is served without a key."""
        if path in PROBE_PATHS or path in PUBLIC_PAGES or path.startswith(PUBLIC_PREFIXES):
            return True
        return path == METRICS_PATH and not self.protect_metrics

    def check(self, authorization: str | None) -> str | None:
        """None if the Authorization header value carries an accepted key, else the failure reason."""
        if not authorization:
            return "missing"
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "malformed"
        given = _digest(token)
        ok = False
        for digest in self.digests:  # every key, no early exit
            ok |= hmac.compare_digest(given, digest)
        return None if ok else "invalid"

    def startup_message(self) -> str:
        if not self.enabled:
            return ("API keys: off: the API is open to anyone who can reach this port "
                    "(set VIT_API_KEY or VIT_API_KEY_FILE to require `Authorization: Bearer <key>`)")
        open_paths = sorted(PROBE_PATHS) + ([] if self.protect_metrics else [METRICS_PATH])
        return (f"API keys: on ({len(self.digests)} key{'s' if len(self.digests) != 1 else ''}); "
                f"open without a key: {', '.join(open_paths)}, the page, the docs and the API's spec")


MESSAGES = {
    "missing": "missing API key: send the header `Authorization: Bearer <key>`",
    "malformed": "malformed Authorization header: expected `Authorization: Bearer <key>`",
    "invalid": "wrong API key",
}


class AuthMiddleware:
    """401 `{"error": ...}` + `WWW-Authenticate: Bearer` for a request without an accepted key.

    Registered before UploadMiddleware, so a request without a key is refused before a byte of
    its body is read. With no keys configured it passes everything through.
    """

    def __init__(self, app: ASGIApp, config: AuthConfig,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.config = config
        self.on_failure = on_failure or (lambda reason: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.config.enabled or self.config.is_open(scope["path"]):
            return await self.app(scope, receive, send)
        authorization = None
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                authorization = value.decode("latin-1")
                break
        reason = self.config.check(authorization)
        if reason is None:
            return await self.app(scope, receive, send)
        self.on_failure(reason)
        challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if reason == "invalid" else "")
        body = error_body(MESSAGES[reason])
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", challenge.encode())]})
        await send({"type": "http.response.body", "body": body})
