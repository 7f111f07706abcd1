"""API keys: `Authorization: Bearer <key>`, each key with a scope and a tenant. `inference` keys may call the
model routes; `admin` keys may also register adapters, run fine-tuning jobs and read /metrics; `metrics`
keys may only read /metrics (Prometheus). A key's tenant is the name written after it (keys of one tenant
share its limits and its cached prompts), else `key#N`, a tenant of its own. With no keys
configured the server is open (a warning says so at start-up). Keys are kept as SHA-256 digests and never
logged. The check runs as ASGI middleware, before any route reads the request body."""

import hashlib
import hmac
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as ASGIScope

from server.errors import APIError

log = logging.getLogger(__name__)

Scope = Literal["inference", "admin", "metrics"]
SCOPES: tuple[Scope, ...] = ("inference", "admin", "metrics")
GRANTS: dict[Scope, frozenset[Scope]] = {"inference": frozenset({"inference"}),
                                         "admin": frozenset({"inference", "admin", "metrics"}),
                                         "metrics": frozenset({"metrics"})}
KEYS_ENV = "SWAPYARD_API_KEYS"
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # a Prometheus label value and a log word


@dataclass(frozen=True)
class KeyEntry:
    scope: Scope
    tenant: str  # the name its limits, usage metrics and cached prompts go by; never the key


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str, source: str) -> dict[bytes, KeyEntry]:
    """`scope:KEY` or `scope:KEY TENANT` entries, one per line or comma-separated; `#` starts a comment. A key
    without a tenant is one of its own, `key#N` by its place among the unnamed (a label that tells nothing about
    the key, and that no written name can take: `#` starts a comment)."""
    keys: dict[bytes, KeyEntry] = {}
    for number, line in enumerate(text.splitlines(), 1):
        for entry in filter(None, (part.strip() for part in line.split("#", 1)[0].split(","))):
            scope, sep, rest = entry.partition(":")
            key, *name = rest.split() or [""]
            if not sep or scope not in SCOPES or not key or len(name) > 1:
                # The entry itself is not echoed: it may be a key.
                raise SystemExit(f"{source}, line {number}: expected `SCOPE:KEY` or `SCOPE:KEY TENANT`, "
                                 f"SCOPE one of {', '.join(SCOPES)}")
            if name and not TENANT_NAME.fullmatch(name[0]):
                raise SystemExit(f"{source}, line {number}: a tenant name is 1-63 letters, digits, '.', '_' or "
                                 f"'-', starting with a letter or digit")
            keys[_digest(key)] = KeyEntry(scope, name[0] if name else "")
    return keys


def name_tenants(keys: dict[bytes, KeyEntry]) -> dict[bytes, KeyEntry]:
    """Unnamed keys get `key#1`, `key#2`... in order; a tenant name that is itself one of the keys (the two
    written the wrong way round) stops the server, as the name would be shown on /metrics."""
    if any(_digest(entry.tenant) in keys for entry in keys.values() if entry.tenant):
        raise SystemExit("API keys: a tenant name is one of the keys; write `SCOPE:KEY TENANT`, the key first")
    unnamed = iter(range(1, len(keys) + 1))
    return {digest: entry if entry.tenant else KeyEntry(entry.scope, f"key#{next(unnamed)}")
            for digest, entry in keys.items()}


class ApiKeys:
    def __init__(self, keys: dict[bytes, KeyEntry]):
        self._keys = keys

    @classmethod
    def load(cls, file: Path | None) -> "ApiKeys":
        keys = parse_keys(os.environ.get(KEYS_ENV, ""), KEYS_ENV)
        if file is not None:
            try:
                keys |= parse_keys(file.read_text(), str(file))
            except OSError as exc:
                raise SystemExit(f"--api-keys-file {file}: {exc.strerror}") from exc
        keys = name_tenants(keys)
        if not keys:
            log.warning("no API keys configured (--api-keys-file, $%s): every route is open", KEYS_ENV)
        return cls(keys)

    @property
    def is_enabled(self) -> bool:
        return bool(self._keys)

    @property
    def tenants(self) -> set[str]:
        return {entry.tenant for entry in self._keys.values()}

    def entry_of(self, key: str) -> KeyEntry | None:
        digest = _digest(key)
        # Compare against every key so the time taken says nothing about which one nearly matched.
        found = [entry for known, entry in self._keys.items() if hmac.compare_digest(known, digest)]
        return found[0] if found else None


OPEN_PATHS = frozenset({"/health", "/ready"})  # probes
ADMIN_PREFIXES = ("/v1/adapters", "/v1/aliases", "/v1/files", "/v1/fine_tuning")


def scope_needed(method: str, path: str) -> Scope | None:
    """The scope a request needs: None for the open probes; everything else, /docs and unknown paths
    included, needs a key, so nothing about the server is told to a client without one. /metrics names
    every adapter and tenant: the metrics scope. Deleting a model (OpenAI's way to delete a fine-tuned one)
    deletes an adapter: admin."""
    if path in OPEN_PATHS:
        return None
    if path == "/metrics":
        return "metrics"
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
        entry = self.keys.entry_of(token.strip()) if kind.lower() == "bearer" else None
        if entry is None:
            refused = APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                               type="authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        elif needed not in GRANTS[entry.scope]:
            refused = APIError(403, f"this API key has the {entry.scope} scope; this route needs "
                                    f"{'an' if needed[0] in 'aeiou' else 'a'} {needed} key",
                               type="permission_error", code="insufficient_scope")
        else:
            scope.setdefault("state", {})["tenant"] = entry.tenant
            await self.app(scope, receive, send)
            return
        await refused.response()(scope, receive, send)
