"""API keys: `Authorization: Bearer <key>`, each key with a scope. `inference` keys may call the model
routes; `admin` keys may also register adapters and run fine-tuning jobs. With no keys configured the
server is open (a warning says so at start-up). Keys are kept as SHA-256 digests and never logged.
The check runs as ASGI middleware, before any route reads the request body."""

import hashlib
import hmac
import logging
import os
from pathlib import Path
from typing import Literal

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as ASGIScope

from server.errors import APIError

log = logging.getLogger(__name__)

Scope = Literal["inference", "admin"]
SCOPES: tuple[Scope, ...] = ("inference", "admin")
KEYS_ENV = "SWAPYARD_API_KEYS"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str, source: str) -> dict[bytes, Scope]:
    """`scope:key` entries, one per line or comma-separated; `#` starts a comment."""
    keys: dict[bytes, Scope] = {}
    for number, line in enumerate(text.splitlines(), 1):
        for entry in filter(None, (part.strip() for part in line.split("#", 1)[0].split(","))):
            scope, sep, key = entry.partition(":")
            if not sep or scope not in SCOPES or not key:
                # The entry itself is not echoed: it may be a key.
                raise SystemExit(f"{source}, line {number}: expected `inference:KEY` or `admin:KEY`")
            keys[_digest(key)] = scope
    return keys


class ApiKeys:
    def __init__(self, keys: dict[bytes, Scope]):
        self._keys = keys

    @classmethod
    def load(cls, file: Path | None) -> "ApiKeys":
        keys = parse_keys(os.environ.get(KEYS_ENV, ""), KEYS_ENV)
        if file is not None:
            try:
                keys |= parse_keys(file.read_text(), str(file))
            except OSError as exc:
                raise SystemExit(f"--api-keys-file {file}: {exc.strerror}") from exc
        if not keys:
            log.warning("no API keys configured (--api-keys-file, $%s): every route is open", KEYS_ENV)
        return cls(keys)

    @property
    def is_enabled(self) -> bool:
        return bool(self._keys)

    def scope_of(self, key: str) -> Scope | None:
        digest = _digest(key)
        # Compare against every key so the time taken says nothing about which one nearly matched.
        found = [scope for known, scope in self._keys.items() if hmac.compare_digest(known, digest)]
        return found[0] if found else None


def tenant_of(key: str) -> str:
    """Who sent a request, for keeping tenants apart (their cached grammars): the start of its key's digest,
    which tells nothing about the key. Without keys every client is one tenant, ""."""
    return _digest(key).hex()[:16]


OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and Prometheus
ADMIN_PREFIXES = ("/v1/adapters", "/v1/files", "/v1/fine_tuning")


def scope_needed(method: str, path: str) -> Scope | None:
    """The scope a request needs: None for the open probes; everything else, /docs and unknown paths
    included, needs a key, so nothing about the server is told to a client without one. Deleting a model
    (OpenAI's way to delete a fine-tuned one) deletes an adapter: admin."""
    if path in OPEN_PATHS:
        return None
    if path.startswith(ADMIN_PREFIXES) or (method == "DELETE" and path.startswith("/v1/models")):
        return "admin"
    return "inference"


class ApiKeyGate:
    """Pure ASGI, outside everything that reads a body: a request without the right key is refused
    before a byte of its body (JSON, multipart or chunked) is read or parsed."""

    def __init__(self, app: ASGIApp, keys: ApiKeys):
        self.app, self.keys = app, keys

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        needed = scope_needed(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if needed is None or not self.keys.is_enabled or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        authorization = Headers(scope=scope).get("authorization", "")
        kind, _, token = authorization.partition(" ")
        granted = self.keys.scope_of(token.strip()) if kind.lower() == "bearer" else None
        if granted is None:
            refused = APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                               type="authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        elif needed == "admin" and granted != "admin":
            refused = APIError(403, "this API key has the inference scope; this route needs an admin key",
                               type="permission_error", code="insufficient_scope")
        else:
            scope.setdefault("state", {})["tenant"] = tenant_of(token.strip())
            await self.app(scope, receive, send)
            return
        await refused.response()(scope, receive, send)
