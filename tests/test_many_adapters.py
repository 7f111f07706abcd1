"""More adapters than device slots: a burst over many adapters queues for slots instead of failing, a cold
adapter is not starved by warm traffic, and the registry cache never serves a replaced or deleted version."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from adapters.base import BaseModelSpec, map_tensors
from adapters.loading import load_adapter
from adapters.registry import AdapterRegistry
from server.engine.residency import FAIR_WAIT_S
from conftest import CHAT, KINDS, MODEL_PATH, ask, running_server, scrape, until_generating

SLOTS = 2
QUESTION = ask("Name a colour.")


def _body(model: str, max_tokens: int = 8) -> dict:
    return {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": max_tokens}


async def _send_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=100)) as client:
        return await asyncio.gather(*(client.post(CHAT, json=body) for body in bodies))


def test_a_burst_over_5x_the_device_slots_queues_and_every_answer_is_right(tmp_path, adapter_root, adapter_dirs):
    folders = {f"burst-{i}": adapter_dirs[kind] for i, kind in enumerate((list(KINDS) * 3)[:5 * SLOTS])}
    with running_server(data_dir=tmp_path / "data", adapter_roots=[adapter_root],
                        max_resident_adapters=SLOTS) as url, httpx.Client(base_url=url, timeout=120) as http:
        for name, folder in folders.items():
            assert http.post("/v1/adapters", json={"name": name, "path": str(folder)}).status_code == 201
        alone = {name: http.post(CHAT, json=_body(name)).json()["choices"][0]["message"]["content"]
                 for name in folders}
        names = list(folders) * 3
        responses = asyncio.run(_send_all(url, [_body(name) for name in names]))
        assert [r.status_code for r in responses] == [200] * len(names), [r.text for r in responses if r.is_error]
        assert [r.json()["choices"][0]["message"]["content"] for r in responses] == [alone[n] for n in names]
        metrics = scrape(http)
        waited = sum(v for (sample, _), v in metrics.items() if sample == "swapyard_adapter_wait_seconds_count")
        assert waited >= len(folders) and metrics[("swapyard_adapter_queue_length", ())] == 0


async def _warm_stream_with_a_cold_request(url: str, warm: str, cold: str) -> tuple[float, float, int]:
    """Three clients keep `warm` busy without a gap; a request for `cold` arrives meanwhile. Returns how long
    the cold request took, how long after it the warm stream went on, and the warm requests served."""
    stop, served = asyncio.Event(), []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def keep_busy(max_tokens: int) -> None:
            while not stop.is_set():
                response = await client.post(CHAT, json=_body(warm, max_tokens))
                assert response.status_code == 200, response.text
                served.append(time.monotonic())

        streams = [asyncio.create_task(keep_busy(n)) for n in (16, 23, 29)]
        await asyncio.sleep(2)
        start = time.monotonic()
        response = await client.post(CHAT, json=_body(cold), timeout=60)  # starved: ReadTimeout
        took = time.monotonic() - start
        assert response.status_code == 200, response.text
        await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*streams)
    return took, served[-1] - start - took, len(served)


def test_a_cold_adapter_is_not_starved_by_a_stream_of_warm_requests(tmp_path, adapter_root, adapter_dirs):
    with running_server(data_dir=tmp_path / "data", adapter_roots=[adapter_root],
                        max_resident_adapters=1) as url, httpx.Client(base_url=url, timeout=120) as http:
        for name, kind in (("warm", "lora"), ("cold", "bottleneck")):
            assert http.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind])}).status_code == 201
        took, warm_after, served = asyncio.run(_warm_stream_with_a_cold_request(url, "warm", "cold"))
        assert took < 30 and warm_after > 0 and served > 3, (took, warm_after, served)


def test_requests_of_a_resident_adapter_pass_one_that_waits_for_a_slot(tmp_path, adapter_root, adapter_dirs):
    """One slot, held by a stream of `warm`: a request for `cold` waits in the engine's queue, and a request for
    `warm` sent after it is admitted past it (admission skips a sequence whose adapter cannot be resident yet)
    instead of queueing behind it. `cold` runs once the stream ends."""
    with running_server(data_dir=tmp_path / "data", adapter_roots=[adapter_root],
                        max_resident_adapters=1) as url, httpx.Client(base_url=url, timeout=120) as http:
        for name, kind in (("pass-warm", "lora"), ("pass-cold", "bottleneck")):
            assert http.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind])}).status_code == 201
        long = {**_body("pass-warm", 150), "ignore_eos": True, "stream": True}
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=url, timeout=120) as other:
            with http.stream("POST", CHAT, json=long) as stream:
                lines = stream.iter_lines()  # held: a dropped iterator closes the response
                until_generating(lines)
                cold = pool.submit(other.post, CHAT, json=_body("pass-cold"))
                while scrape(http)[("swapyard_adapter_queue_length", ())] < 1:
                    assert not cold.done(), cold.result().text
                    time.sleep(0.05)
                warm = http.post(CHAT, json=_body("pass-warm"))
                assert warm.status_code == 200 and not cold.done()
                assert scrape(http)[("swapyard_adapter_queue_length", ())] == 1
                for _ in lines:  # the stream runs to its end: then the slot frees
                    pass
            assert cold.result().status_code == 200, cold.result().text
        assert scrape(http)[("swapyard_adapter_queue_length", ())] == 0


def test_a_drained_adapter_serves_again_when_the_request_that_waited_for_its_slot_leaves(tmp_path, adapter_root,
                                                                                          adapter_dirs):
    """A request for `cold` waits long enough for the busy `warm` to drain (its new requests wait, so its slot
    frees), then its client leaves: `warm` serves new requests again at once, not never."""
    with running_server(data_dir=tmp_path / "data", adapter_roots=[adapter_root],
                        max_resident_adapters=1) as url, httpx.Client(base_url=url, timeout=120) as http:
        for name, kind in (("drain-warm", "lora"), ("drain-cold", "bottleneck")):
            assert http.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind])}).status_code == 201
        long = {**_body("drain-warm", 300), "ignore_eos": True, "stream": True}
        with http.stream("POST", CHAT, json=long) as stream, httpx.Client(base_url=url, timeout=120) as other:
            lines = stream.iter_lines()  # held: a dropped iterator closes the response
            until_generating(lines)
            with other.stream("POST", CHAT, json={**_body("drain-cold"), "stream": True}) as cold:
                assert cold.status_code == 200
                time.sleep(FAIR_WAIT_S + 1.5)  # it waits: `warm` drains
            start = time.monotonic()
            warm = http.post(CHAT, json=_body("drain-warm"))
            assert warm.status_code == 200, warm.text
            took = time.monotonic() - start
            assert next(lines, None) is not None, "the stream ended first: make it longer"
        assert took < 10, took


def test_registry_cache_sees_every_change_at_once_in_this_replica_and_the_others(tmp_path, adapter_dirs):
    here, there = AdapterRegistry(tmp_path), AdapterRegistry(tmp_path)  # two replicas on one store
    here.add("shared", "lora", 0, adapter_dirs["lora"], source="test", replace=False, is_pinned=False)
    assert here.get("shared").version == 1 and there.get("shared").version == 1
    there.add("shared", "lora", 0, adapter_dirs["lora2"], source="test", replace=True, is_pinned=False)
    assert here.get("shared").version == 2 and there.get("shared").version == 2
    here.remove("shared")
    assert here.get("shared") is None and there.get("shared") is None and there.list() == []


def test_the_host_tier_reloads_without_the_disk_and_never_serves_a_replaced_version(tmp_path, adapter_root,
                                                                                     adapter_dirs):
    with running_server(data_dir=tmp_path / "data", adapter_roots=[adapter_root],
                        max_resident_adapters=1) as url, httpx.Client(base_url=url, timeout=120) as http:
        def answer(name: str) -> str:
            return http.post(CHAT, json=_body(name)).json()["choices"][0]["message"]["content"]

        for name, kind in (("host-a", "lora"), ("host-b", "bottleneck"), ("host-ref", "lora2")):
            assert http.post("/v1/adapters", json={"name": name, "path": str(adapter_dirs[kind])}).status_code == 201
        first, reference, other = answer("host-a"), answer("host-ref"), answer("host-b")
        assert first != reference
        assert answer("host-a") == first  # back from the host tier
        replaced = http.post("/v1/adapters", json={"name": "host-a", "path": str(adapter_dirs["lora2"]),
                                                   "replace": True})
        assert replaced.status_code == 201
        assert answer("host-b") == other and answer("host-a") == reference  # version 2, never the cached 1
        hits = scrape(http)[("swapyard_adapter_host_cache_total", (("result", "hit"),))]
        assert hits >= 4, hits
        assert http.delete("/v1/adapters/host-a").status_code == 200
        assert http.post(CHAT, json=_body("host-a")).status_code == 404


def test_the_host_tier_form_reaches_every_tensor_of_every_kind(adapter_dirs):
    """On a GPU the host tier pins each parsed adapter with map_tensors (not testable here); every tensor of
    every kind must go through it, so none is left to a slow synchronous copy."""
    base = BaseModelSpec.from_pretrained(MODEL_PATH)
    expected = {"lora": lambda a: [t for w in a.layers.values() for t in (w.a, w.b)],
                "prefix": lambda a: [a.keys, a.values], "prompt": lambda a: [a.embeddings],
                "bottleneck": lambda a: [a.down_weight, a.down_bias, a.up_weight, a.up_bias]}
    for kind in KINDS:
        adapter = load_adapter(adapter_dirs[kind], base, max_lora_rank=64)
        doubled = map_tensors(adapter, lambda tensor: tensor.double())
        assert type(doubled) is type(adapter)
        assert all(t.dtype == torch.float64 for t in expected[kind](doubled)), kind
        assert all(t.dtype != torch.float64 for t in expected[kind](adapter)), kind  # a copy, not changed in place
