"""An InferencePool of swapyard replicas routes by the Gateway API Inference Extension's model-server protocol:
the torch engine exports its metrics under the names the endpoint picker reads for vLLM (queued and running
requests, KV-cache use, the LoRA info gauge), moving as requests queue and run; beside them, adapters by
residency tier, which vLLM lacks, and each adapter's tier on its card. Pinning is bounded. (The vLLM engine's
own export of the same names is checked in test_vllm_engine.py.)"""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from conftest import CHAT, ask, gateway_load, running_server, scrape, until_generating

# Long enough to outlast the checks made while it runs (its client leaves then, which aborts it).
LONG = {"messages": ask("Count from one to a hundred."), "temperature": 0, "max_tokens": 900, "ignore_eos": True}


def _register(http, name, folder, **extra) -> httpx.Response:
    return http.post("/v1/adapters", json={"name": name, "path": str(folder), **extra})


def test_protocol_metrics_move_as_requests_queue_and_run(tmp_path, adapter_dirs, adapter_root):
    # One sequence at a time: a second request queues behind the first.
    with running_server(data_dir=tmp_path / "data", adapter_roots=[adapter_root], max_resident_adapters=2,
                        max_num_seqs=1) as url, httpx.Client(base_url=url, timeout=120) as http, \
            ThreadPoolExecutor(1) as pool:
        for name, kind in (("gw-a", "lora"), ("gw-b", "prompt")):
            assert _register(http, name, adapter_dirs[kind]).status_code == 201
        assert http.put("/v1/aliases/gw-prod", json={"model": "gw-a@1"}).status_code == 200
        idle = gateway_load(http)
        assert idle["vllm:num_requests_running"]["value"] == idle["vllm:num_requests_waiting"]["value"] == 0
        with http.stream("POST", CHAT, json={**LONG, "model": "gw-prod", "stream": True}) as stream:
            lines = stream.iter_lines()  # held: a generator let go closes the stream
            until_generating(lines)
            queued = pool.submit(http.post, CHAT, json={**LONG, "model": "gw-b", "max_tokens": 4})
            deadline = time.monotonic() + 30
            while (load := gateway_load(http))["vllm:num_requests_waiting"]["value"] < 1:
                assert time.monotonic() < deadline, load
                time.sleep(0.05)
            assert load["vllm:num_requests_running"]["value"] == 1 and load["vllm:kv_cache_usage_perc"]["value"] > 0
            lora = load["vllm:lora_requests_info"]
            assert lora["max_lora"] == "2" and lora["value"] > time.time() - 60
            # The pinned version runs, under the name it serves and the alias the request gave.
            assert set(lora["running_lora_adapters"].split(",")) >= {"gw-a@1", "gw-prod"}
            assert lora["waiting_lora_adapters"] == "gw-b"
        assert queued.result().status_code == 200
        deadline = time.monotonic() + 10
        while (load := gateway_load(http))["vllm:num_requests_running"]["value"] != 0:
            assert time.monotonic() < deadline, load
            time.sleep(0.05)
        assert load["vllm:num_requests_waiting"]["value"] == 0 and load["vllm:kv_cache_usage_perc"]["value"] == 0
        assert load["vllm:lora_requests_info"]["waiting_lora_adapters"] == ""


def test_residency_tiers_and_the_pinning_limit(tmp_path, adapter_dirs, adapter_root):
    with running_server(data_dir=tmp_path / "data", adapter_roots=[adapter_root],
                        max_resident_adapters=2) as url, httpx.Client(base_url=url, timeout=120) as http:
        assert _register(http, "tier-a", adapter_dirs["lora"], pinned=True).status_code == 201
        # Two device slots: one may be pinned (the default keeps one for the others).
        refused = _register(http, "tier-b", adapter_dirs["lora2"], pinned=True)
        assert refused.status_code == 409 and refused.json()["error"]["param"] == "pinned", refused.text
        assert http.get("/v1/adapters/tier-b").status_code == 404
        assert _register(http, "tier-a", adapter_dirs["lora2"], pinned=True, replace=True).status_code == 201
        for name, kind in (("tier-b", "prefix"), ("tier-c", "prompt")):  # tier-c takes tier-b's slot
            assert _register(http, name, adapter_dirs[kind]).status_code == 201
        tiers = {card["id"]: card["residency"] for card in http.get("/v1/adapters").json()["data"]}
        assert tiers == {"tier-a": "device", "tier-b": "host", "tier-c": "device"}
        metrics = scrape(http)
        assert metrics[("swapyard_adapters_resident", (("tier", "device"),))] == 2
        assert metrics[("swapyard_adapters_resident", (("tier", "host"),))] >= 1
