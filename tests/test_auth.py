"""API keys: inference keys reach the model routes only, metrics keys /metrics only, admin keys everything;
no key or a wrong one is 401, a key of the wrong scope 403; health and readiness stay open; keys never reach
the log; keys never share cached prompt blocks."""

import logging
import socket
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, ask, running_server, scrape, start_serve_process
from server.auth import name_tenants, parse_keys

INFERENCE_KEY, ADMIN_KEY, METRICS_KEY = "sk-infer-0123456789", "sk-admin-9876543210", "sk-metrics-555"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    keys = tmp / "keys.txt"
    keys.write_text(f"# one key per line\nadmin:{ADMIN_KEY}\nmetrics:{METRICS_KEY} prometheus\n")
    mp = pytest.MonkeyPatch()
    mp.setenv("SWAPYARD_API_KEYS", f"inference:{INFERENCE_KEY}")
    try:
        with running_server(api_keys_file=keys, data_dir=tmp / "data") as url:
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

    assert httpx.get(f"{secured}/v1/models/{MODEL}", headers=_bearer(INFERENCE_KEY)).status_code == 200
    for method, path in (("GET", "/v1/adapters"), ("POST", "/v1/adapters"), ("GET", "/v1/fine_tuning/jobs"),
                         ("POST", "/v1/files"), ("DELETE", "/v1/models/any-adapter"), ("DELETE", "/v1/models")):
        denied = httpx.request(method, f"{secured}{path}", headers=_bearer(INFERENCE_KEY))
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "insufficient_scope", path
    assert httpx.get(f"{secured}/v1/adapters", headers=_bearer(ADMIN_KEY)).status_code == 200

    for path in ("/health", "/ready"):
        assert httpx.get(f"{secured}{path}").status_code == 200, path
    # /metrics names every adapter and tenant: a metrics (or admin) key, and nothing else with it.
    assert httpx.get(f"{secured}/metrics").status_code == 401
    assert httpx.get(f"{secured}/metrics", headers=_bearer(INFERENCE_KEY)).status_code == 403
    assert httpx.get(f"{secured}/metrics", headers=_bearer(ADMIN_KEY)).status_code == 200
    scraped = httpx.get(f"{secured}/metrics", headers=_bearer(METRICS_KEY))
    assert scraped.status_code == 200 and "swapyard_tenant_tokens_total" in scraped.text
    assert INFERENCE_KEY not in scraped.text and "sk-" not in scraped.text  # tenants by name, never by key
    denied = _chat(secured, _bearer(METRICS_KEY))
    assert denied.status_code == 403 and "metrics scope" in denied.json()["error"]["message"]
    assert INFERENCE_KEY not in caplog.text and ADMIN_KEY not in caplog.text


def test_malformed_key_entries_are_refused_without_echoing_them():
    with pytest.raises(SystemExit, match="keys.txt, line 2") as stopped:
        parse_keys("admin:sk-good\nsuperuser:sk-secret-value\n", "keys.txt")
    assert "sk-secret-value" not in str(stopped.value)
    assert len(parse_keys("inference:a, admin:b  # two keys\n\n", "env")) == 2
    named = name_tenants(parse_keys("inference:a acme, inference:b acme, metrics:c, inference:d", "env"))
    assert sorted(entry.tenant for entry in named.values()) == ["acme", "acme", "key#1", "key#2"]
    with pytest.raises(SystemExit, match="the key first"):  # `SCOPE:TENANT KEY`: the key would be on /metrics
        name_tenants(parse_keys("inference:acme sk-secret-value, admin:sk-secret-value", "env"))
    for bad in ("inference:a two words", "inference:a -dash", "inference:", "reader:a"):
        with pytest.raises(SystemExit, match="env, line 1"):
            parse_keys(bad, "env")


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def _send(url: str, path: str, body, headers: dict) -> int | None:
    """The status, or None when the server closed the connection before taking the whole body."""
    try:
        return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=60).status_code
    except httpx.TransportError:
        return None


def test_no_body_is_read_before_the_key_is_checked(tmp_path, monkeypatch):
    """300 MB without a key, claimed as multipart, chunked or not, to JSON and upload routes alike:
    refused before the body is read, so the server's memory does not move."""
    monkeypatch.setenv("SWAPYARD_API_KEYS", f"admin:{ADMIN_KEY}")
    proc, url = start_serve_process(tmp_path / "serve.log", "--max-model-len", "512",
                                    "--data-dir", str(tmp_path / "data"))
    try:
        multipart = {"content-type": "multipart/form-data; boundary=xyz"}

        def body():
            yield b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n"
            for _ in range(300):
                yield b"\0" * 2**20

        before = _rss_mb(proc.pid)
        for path in ("/v1/chat/completions", "/v1/fine_tuning/jobs", "/v1/adapters", "/v1/files"):
            assert _send(url, path, body(), multipart) in (401, None), path
            assert _send(url, path, b"\0" * 300 * 2**20, multipart) in (401, None), path
        assert _rss_mb(proc.pid) - before < 20
        assert httpx.get(f"{url}/health").status_code == 200
        # With a key, a multipart body sent to a JSON route gets the JSON limit, not the upload one.
        assert _send(url, "/v1/chat/completions", b"\0" * 9 * 2**20, {**multipart, **_bearer(ADMIN_KEY)}) == 413
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_docs_and_schema_need_a_key(secured):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{secured}{path}").status_code == 401, path
        assert httpx.get(f"{secured}{path}", headers=_bearer(INFERENCE_KEY)).status_code == 200, path


def test_huge_headers_are_refused_without_reading_them(secured):
    with socket.create_connection(("127.0.0.1", int(secured.rsplit(":", 1)[1])), timeout=30) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
        try:
            for _ in range(64):  # 64 MB, unless the server gives up on the request first
                conn.sendall(b"k" * 2**20)
        except OSError:
            pass  # closed on us: refused
        conn.settimeout(30)
        try:
            reply = conn.recv(256)
        except OSError:
            reply = b""
    assert not reply.startswith(b"HTTP/1.1 200"), reply
    assert httpx.get(f"{secured}/health").status_code == 200


def test_keys_never_share_cached_prompt_blocks(secured):
    """Each key's requests are salted by key: a prompt one key sent is cached for that key only, so another
    key learns nothing from its time to first token (or from the hit counter on /metrics)."""
    system = "You are the archivist of a city library. " + " ".join(
        f"Rule {i}: ledger {i} stays in room {i % 7}." for i in range(30))
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]}

    def hits_after(key: str) -> float:
        before = _hits(secured)
        assert httpx.post(f"{secured}/v1/chat/completions", json=body, headers=_bearer(key),
                          timeout=60).status_code == 200
        return _hits(secured) - before

    hits_after(INFERENCE_KEY)
    assert hits_after(ADMIN_KEY) == 0  # the other key's blocks are not its own
    assert hits_after(INFERENCE_KEY) > 100  # its own are


def _hits(url: str) -> float:
    with httpx.Client(base_url=url, headers=_bearer(METRICS_KEY)) as client:
        return scrape(client).get(("swapyard_prefix_cache_hits_total", ()), 0)
