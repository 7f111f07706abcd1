"""Shared fixtures. Every test runs against the embedded SmolLM2 on the real torch engine over real HTTP:
one uvicorn server on a loopback port per test session, since loading the model costs seconds.
The context is cut to 1024 tokens so that context-limit errors are cheap to provoke."""

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from server.app import build_app
from server.default_model import DEFAULT_MODEL_NAME
from server.settings import ServeSettings

MODEL = DEFAULT_MODEL_NAME
MAX_MODEL_LEN = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def base_url():
    settings = ServeSettings(engine="torch", max_model_len=MAX_MODEL_LEN, port=free_port())
    server = uvicorn.Server(uvicorn.Config(build_app(settings), host="127.0.0.1", port=settings.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{settings.port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


@pytest.fixture
def oai(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def scrape(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = http.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]
