"""Shared fixtures. Every test runs against the embedded SmolLM2 on the real torch engine over real HTTP:
one uvicorn server on a loopback port per test session, since loading the model costs seconds
(tests that need other settings, or a restart, start their own with `running_server`).
The context is cut to 1024 tokens so that context-limit errors are cheap to provoke.
Adapters are small random ones of every kind (tests/adapter_factory.py), made once per session."""

import asyncio
import ctypes
import gc
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from adapter_factory import KINDS, make_adapter
from postgres import PostgresCluster
from server.app import UVICORN_HTTP, build_app
from server.default_model import DEFAULT_MODEL_NAME, default_model_dir
from server.host import keep_torch_to_one_thread
from server.settings import DEFAULT_CACHE_DIR, ServeSettings

# The servers of a test session run in this process, each on an engine thread with torch on every core; the
# references tests compute on this thread would add an OpenMP team of their own, and then every team sleeps
# between parallel regions (server/host.py): the session's server answered 1.75x slower from the first
# adapter made here on (48 tokens: 1.53 -> 2.68 s). So this thread runs torch on one.
keep_torch_to_one_thread()
MODEL = DEFAULT_MODEL_NAME
MAX_MODEL_LEN = 1024
MODEL_PATH = default_model_dir(DEFAULT_CACHE_DIR)
MAX_UPLOAD_MB = 32
CHAT = "/v1/chat/completions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving_app(**settings):
    """A real uvicorn server for the app on a free loopback port; yields (base URL, app), so a test can
    reach the engine inside it (to inject a failure)."""
    # float32 unless a test asks: exactness against transformers and PEFT is checked in float32 on every host.
    # A data folder of its own unless the test shares one (replicas): no server sees another's jobs.
    config = ServeSettings(**{"engine": "torch", "dtype": "float32", "max_model_len": MAX_MODEL_LEN,
                              "port": free_port(), "max_upload_mb": MAX_UPLOAD_MB,
                              "data_dir": tempfile.mkdtemp(prefix="swapyard-data-"), **settings})
    app = build_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning",
                                           **UVICORN_HTTP))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    url = f"http://127.0.0.1:{config.port}"
    while not (server.started and httpx.get(f"{url}/ready").status_code == 200):
        assert thread.is_alive() and time.monotonic() < deadline, "server did not get ready"
        time.sleep(0.1)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        # Give the model's memory back to the host: a vLLM engine core the tests start reserves half of it.
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def running_server(**settings):
    """A real uvicorn server for the app on a free loopback port; yields its base URL."""
    with serving_app(**settings) as (url, _):
        yield url


def start_serve_process(log: Path, *args: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """`swapyard serve ARGS` as its own process on a free loopback port, returned once /ready answers 200;
    its output goes to `log` (a pipe nobody reads would stall a chatty server)."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not get ready: {log.read_text(errors='replace')[-3000:]}")
        try:
            ready = httpx.get(f"{url}/ready")
            if ready.status_code == 200:
                return proc, url
            if ready.json().get("status") == "failed":  # loading failed: say why now, not at the deadline
                proc.kill()
                raise AssertionError(f"server failed to load: {log.read_text(errors='replace')[-3000:]}")
        except httpx.TransportError:
            pass
        time.sleep(0.5)  # /ready answers 503 at once while the model loads: do not spin


@pytest.fixture(scope="session")
def postgres() -> PostgresCluster:
    """One throwaway PostgreSQL server for the session; tests take a fresh database each (`database_url`)."""
    cluster = PostgresCluster(free_port())
    cluster.start()
    yield cluster
    cluster.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """The registry and job database, for tests that run on both: a fresh SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'swapyard.sqlite3'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    """The one server folder adapters may be registered from by path."""
    return tmp_path_factory.mktemp("adapter-root")


@pytest.fixture(scope="session")
def adapter_dirs(adapter_root) -> dict[str, Path]:
    """One adapter folder per kind, plus a second LoRA ("lora2") for version swaps."""
    dirs = {kind: make_adapter(kind, MODEL_PATH, adapter_root / kind) for kind in KINDS}
    dirs["lora2"] = make_adapter("lora", MODEL_PATH, adapter_root / "lora2", seed=1)
    return dirs


@pytest.fixture(scope="session")
def base_url(tmp_path_factory, adapter_root):
    with running_server(data_dir=tmp_path_factory.mktemp("data"), adapter_roots=[adapter_root],
                        max_resident_adapters=6) as url:
        yield url


@pytest.fixture(scope="module")
def every_kind(adapter_dirs, adapter_root, tmp_path_factory):
    """A float32 server of the module's own with one adapter of every kind registered under its kind's name:
    (httpx client, app, openai client)."""
    with serving_app(data_dir=tmp_path_factory.mktemp("data"), adapter_roots=[adapter_root]) as (url, app):
        with httpx.Client(base_url=url, timeout=120) as http:
            for kind in KINDS:
                assert http.post("/v1/adapters", json={"name": kind, "path": str(adapter_dirs[kind])}
                                 ).status_code == 201
            yield http, app, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture
def oai(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def until_adapter_card(url: str, name: str, seen: Callable[[dict], bool]) -> None:
    """Wait until `url`'s card for adapter `name` (or its error) shows `seen`: a replica follows registry
    changes made through another within a second (its watcher thread reloads its copy)."""
    deadline = time.monotonic() + 1.0
    while not seen(card := httpx.get(f"{url}/v1/adapters/{name}").json()):
        assert time.monotonic() < deadline, card
        time.sleep(0.02)


def until_generating(lines: Iterator[str]) -> None:
    """Read a chat stream's SSE lines up to the first chunk that carries generated text: the first chunk (the
    assistant's role) is sent before the request reaches the engine."""
    for line in lines:
        if line.startswith("data: {") and any(c["delta"].get("content") for c in json.loads(line[6:])["choices"]):
            return
    raise AssertionError("the stream ended before any text")


def scrape(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = http.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def running(metrics: dict[tuple[str, tuple], float], model: str) -> float:
    """Requests of `model` generating tokens, in a scrape: whichever version of it serves them."""
    return sum(value for (name, labels), value in metrics.items()
               if name == "swapyard_requests_running" and ("model", model) in labels)


# The Gateway API Inference Extension's model-server protocol, under the names its endpoint picker reads (vLLM's):
# each family's type and label names, as docs/proposals/003-model-server-protocol states them.
GATEWAY_PROTOCOL = {
    "vllm:num_requests_waiting": ("gauge", set()), "vllm:num_requests_running": ("gauge", set()),
    "vllm:kv_cache_usage_perc": ("gauge", set()),
    "vllm:lora_requests_info": ("gauge", {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}),
}


def gateway_load(http: httpx.Client) -> dict[str, dict]:
    """The protocol's families on /metrics, checked for type and labels: {name: labels and value of its newest
    sample (the LoRA info gauge's value is when it was seen)}."""
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    load = {}
    for name, (kind, labels) in GATEWAY_PROTOCOL.items():
        family = families[name]
        assert family.type == kind and family.samples, name
        newest = max(family.samples, key=lambda sample: sample.value if labels else 0)
        assert labels <= set(newest.labels), (name, newest.labels)
        load[name] = {**newest.labels, "value": newest.value}
    return load


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def in_one_step(http: httpx.Client, app, bodies: list[dict]) -> list[httpx.Response]:
    """Send `bodies` concurrently while the engine thread is held, then let it go: it takes them all at
    once, so they are prefilled in one step (asserted on the batch-size histogram)."""
    engine, held = app.state.engine, threading.Event()
    engine._inbox.put(held.wait)

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=120) as client:
            sent = [asyncio.create_task(client.post(CHAT, json=body)) for body in bodies]
            while engine._inbox.qsize() < len(bodies):
                await asyncio.sleep(0.01)
            held.set()
            return await asyncio.gather(*sent)

    try:
        wide_before = steps_wider_than(http, 4)
        responses = asyncio.run(send())
    finally:
        held.set()  # whatever failed, the engine thread is let go (else the server never shuts down)
    assert len(bodies) > 4 and steps_wider_than(http, 4) > wide_before
    return responses


def steps_wider_than(http: httpx.Client, width: int) -> float:
    """Engine steps (prefill, decode or mixed) that ran more than `width` sequences; `width` a bucket bound."""
    metrics = scrape(http)
    return sum(metrics.get(("swapyard_engine_batch_size_count", (("phase", phase),)), 0)
               - metrics.get(("swapyard_engine_batch_size_bucket", (("le", f"{float(width)}"), ("phase", phase))), 0)
               for phase in ("prefill", "decode", "mixed"))  # a phase that never ran has no series yet
