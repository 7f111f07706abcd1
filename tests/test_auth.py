"""API keys: inference keys reach the model routes only, admin keys everything; no key or a wrong one
is 401, a key of the wrong scope 403; health, readiness and metrics stay open; keys never reach the log."""

import logging

import httpx
import pytest

from conftest import MODEL, ask, running_server
from server.auth import parse_keys

INFERENCE_KEY, ADMIN_KEY = "sk-infer-0123456789", "sk-admin-9876543210"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    keys = tmp / "keys.txt"
    keys.write_text(f"# one key per line\nadmin:{ADMIN_KEY}\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("SWAPYARD_API_KEYS", f"inference:{INFERENCE_KEY}")
    try:
        with running_server(api_keys_file=keys, adapter_store=tmp / "store", fine_tuning_dir=tmp / "ft") as url:
            yield url
    finally:
        mp.undo()


def _chat(url: str, headers: dict) -> httpx.Response:
    body = {"model": MODEL, "messages": ask("Hi"), "max_tokens": 2}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_keys_and_scopes(secured, caplog):
    caplog.set_level(logging.DEBUG)
    missing = _chat(secured, {})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert _chat(secured, _bearer("sk-wrong")).status_code == 401
    assert _chat(secured, {"Authorization": INFERENCE_KEY}).status_code == 401  # not a Bearer credential

    assert _chat(secured, _bearer(INFERENCE_KEY)).status_code == 200
    assert _chat(secured, _bearer(ADMIN_KEY)).status_code == 200
    assert httpx.get(f"{secured}/v1/models", headers=_bearer(INFERENCE_KEY)).status_code == 200

    for method, path in (("GET", "/v1/adapters"), ("POST", "/v1/adapters"), ("GET", "/v1/fine_tuning/jobs"),
                         ("POST", "/v1/files")):
        denied = httpx.request(method, f"{secured}{path}", headers=_bearer(INFERENCE_KEY))
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope", path
    assert httpx.get(f"{secured}/v1/adapters", headers=_bearer(ADMIN_KEY)).status_code == 200

    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{secured}{path}").status_code == 200, path
    assert INFERENCE_KEY not in caplog.text and ADMIN_KEY not in caplog.text


def test_malformed_key_entries_are_refused_without_echoing_them():
    with pytest.raises(SystemExit, match="keys.txt, line 2") as stopped:
        parse_keys("admin:sk-good\nsuperuser:sk-secret-value\n", "keys.txt")
    assert "sk-secret-value" not in str(stopped.value)
    assert len(parse_keys("inference:a, admin:b  # two keys\n\n", "env")) == 2
