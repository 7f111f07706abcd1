"""Reliability: /health is live while the model loads and /ready says when it is served; SIGTERM drains
in-flight streams before exit; kill -9 in the middle of a registration leaves the registry as it was;
a stored adapter gone corrupt fails only its own requests; replicas share one registry and store."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from adapters.registry import AdapterRegistry
from conftest import MODEL, ask, free_port, running_server, until_adapter_card


def _chat(url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": ask("Write a short poem about the sea."), "temperature": 0, "max_tokens": 16}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_ready_after_loading_and_sigterm_drains_streams(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--engine", "torch", "--port", str(port),
                             "--data-dir", str(tmp_path / "data")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen_loading = False
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            try:
                health, ready = httpx.get(f"{url}/health"), httpx.get(f"{url}/ready")
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            assert health.status_code == 200
            if ready.status_code == 200:
                break
            assert ready.json() == {"status": "loading"}
            if not seen_loading:
                early = _chat(url, MODEL)
                assert early.status_code == 503 and early.json()["error"]["code"] == "loading"
                assert early.headers["retry-after"]
            seen_loading = True
        assert seen_loading  # the model takes seconds to load: /health answered before /ready did

        lines: list[str] = []
        first_token = threading.Event()

        def stream() -> None:
            body = {"model": MODEL, "messages": ask("Count to fifty."), "max_tokens": 64, "ignore_eos": True,
                    "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if '"content":"' in line and '"content":""' not in line:
                        first_token.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_token.wait(60)
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 64  # the stream ran to its end
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")
    finally:
        proc.kill()
        proc.wait()


_REGISTER_FOREVER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from adapters.registry import AdapterRegistry
    registry = AdapterRegistry(Path(sys.argv[1]), sweep_after_s=0)
    sources = [Path(sys.argv[2]), Path(sys.argv[3])]
    for i in range(10**6):
        registry.add("victim", "lora", 0, sources[i % 2], source=str(i), replace=True, is_pinned=False)
        print(i, flush=True)
""")


def test_kill_9_mid_registration_leaves_a_whole_version(tmp_path):
    sources = []
    for i in range(2):
        folder = tmp_path / f"source{i}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "i": i}))
        (folder / "adapter_model.safetensors").write_bytes(os.urandom(24 * 2**20))
        sources.append(folder)
    root, rng = tmp_path / "registry", random.Random(0)
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _REGISTER_FOREVER, str(root), *map(str, sources)],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one registration committed
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()

        registry = AdapterRegistry(root, sweep_after_s=0)  # what a restarted server sees
        record = registry.get("victim")
        assert record is not None, f"trial {trial}"
        stored = registry.path(record)
        source = sources[int(record.source) % 2]
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (stored / name).read_bytes() == (source / name).read_bytes(), f"trial {trial}: {name}"
        # The sweep left only the files of kept versions (staged copies and pruned versions' files are gone).
        assert [p.name for p in registry.store.iterdir()] == ["sha256"]
        assert {f"sha256/{p.name}" for p in (registry.store / "sha256").iterdir()} == \
            {version.folder for version in registry.snapshot().versions["victim"].values()}


def test_corrupt_stored_adapter_fails_only_its_own_requests(tmp_path, adapter_dirs, adapter_root):
    data = tmp_path / "data"
    # No host tier: c-a's next load must read the corrupted store (with one, its checked copy would serve).
    with running_server(max_resident_adapters=1, max_cpu_adapters=0, data_dir=data,
                        adapter_roots=[adapter_root]) as url:
        for name, kind in (("c-a", "lora"), ("c-b", "lora2")):  # c-b's load evicts c-a
            registered = httpx.post(f"{url}/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind])})
            assert registered.status_code == 201
        sha256 = httpx.get(f"{url}/v1/adapters/c-a").json()["sha256"]
        weights = data / "adapters" / "store" / "sha256" / sha256 / "adapter_model.safetensors"
        weights.write_bytes(b"\0garbage" * 64)

        broken = _chat(url, "c-a")
        assert broken.status_code == 500
        assert broken.json()["error"]["code"] == "adapter_load_failed" and "c-a" in broken.json()["error"]["message"]
        assert _chat(url, MODEL).status_code == 200 and _chat(url, "c-b").status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200


def test_replicas_share_one_registry(tmp_path, adapter_dirs, adapter_root):
    shared = {"data_dir": tmp_path / "data", "adapter_roots": [adapter_root]}
    with running_server(**shared) as a, running_server(**shared) as b:
        registered = httpx.post(f"{a}/v1/adapters", json={"name": "shared", "path": str(adapter_dirs["lora"])})
        assert registered.status_code == 201
        first = _chat(a, "shared").json()["choices"][0]["message"]["content"]
        assert _chat(b, "shared").json()["choices"][0]["message"]["content"] == first

        replaced = httpx.post(f"{a}/v1/adapters", json={"name": "shared", "path": str(adapter_dirs["lora2"]),
                                                         "replace": True})
        assert replaced.status_code == 201
        second = _chat(a, "shared").json()["choices"][0]["message"]["content"]
        until_adapter_card(b, "shared", lambda card: card.get("version") == 2)
        assert second != first and _chat(b, "shared").json()["choices"][0]["message"]["content"] == second

        assert httpx.delete(f"{a}/v1/adapters/shared").status_code == 200
        until_adapter_card(b, "shared", lambda card: "error" in card)
        assert _chat(b, "shared").status_code == 404
