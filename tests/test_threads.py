"""Torch's threads in a serving process: all cores on the engine's thread, one everywhere else. A worker
thread that read an adapter with torch's default threads got an OpenMP team of its own, and once a process
holds more OpenMP threads than cores every team sleeps between parallel regions: the engine's steps took
2.3x as long from the first adapter read on (see server/host.keep_torch_to_one_thread)."""

import asyncio
import queue
import time

import httpx
import torch

from conftest import ask, serving_app
from server.host import ENGINE_TORCH_THREADS


async def count_threads() -> int:
    return torch.get_num_threads()


def count_threads_after_a_while() -> int:
    time.sleep(0.2)  # held, so that the pool starts new worker threads for the others
    return torch.get_num_threads()


async def count_on_workers() -> set[int]:
    """Counts on the worker threads `to_thread` uses, new ones among them (those start after the engine)."""
    return set(await asyncio.gather(*(asyncio.to_thread(count_threads_after_a_while) for _ in range(12))))


def test_torch_runs_on_every_core_on_the_engine_thread_only(tmp_path, adapter_dirs, adapter_root):
    with serving_app(data_dir=tmp_path / "data", adapter_roots=[adapter_root]) as (url, app):
        with httpx.Client(base_url=url, timeout=120) as http:
            # read (parsed, checked, cast) on a worker thread: where the extra team came from
            http.post("/v1/adapters", json={"name": "lora", "path": str(adapter_dirs["lora"])}).raise_for_status()
            answer = http.post("/v1/chat/completions", json={"model": "lora", "messages": ask("Hi"), "max_tokens": 2})
            assert answer.status_code == 200, answer.text
        on_engine: queue.SimpleQueue = queue.SimpleQueue()
        app.state.engine._inbox.put(lambda: on_engine.put(torch.get_num_threads()))
        loop = app.state.jobs._task.get_loop()
        on_workers = asyncio.run_coroutine_threadsafe(count_on_workers(), loop).result(30)
        on_loop = asyncio.run_coroutine_threadsafe(count_threads(), loop).result(30)
        assert (on_engine.get(timeout=30), on_workers, on_loop) == (ENGINE_TORCH_THREADS, {1}, 1)
