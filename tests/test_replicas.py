"""Replicas on PostgreSQL: real `swapyard serve` processes sharing one database and one store volume, as two
pods behind a load balancer would (README, "Scale-out")."""

import asyncio
import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
from sqlalchemy import update

from conftest import CHAT, MODEL, ask, running_server, start_serve_process, until_adapter_card
from postgres import StallingProxy
from server.database import Database
from server.database.schema import jobs
from training.jobs import JobStore

EXAMPLES = Path(__file__).resolve().parents[1] / "training" / "examples"
JOBS = "/v1/fine_tuning/jobs"
QUESTION = ask("Write a short poem about the sea.")


@contextmanager
def replicas(tmp_path: Path, database_url: str, adapter_root: Path, count: int = 2):
    """`count` server processes on one database, one adapter store and one fine-tuning folder."""
    shared = ["--engine", "torch", "--dtype", "float32", "--max-model-len", "512", "--database-url", database_url,
              "--data-dir", str(tmp_path / "data"),
              "--adapter-roots", json.dumps([str(adapter_root)])]
    started: list = []
    try:
        for index in range(count):
            started.append(start_serve_process(tmp_path / f"replica-{index}.log", *shared))
        yield started
    finally:
        for proc, _ in started:
            proc.kill()
            proc.wait()


def _seconds(call) -> float:
    start = time.monotonic()
    call()
    return time.monotonic() - start


def _answer(url: str, model: str) -> str:
    body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 24}
    response = httpx.post(f"{url}{CHAT}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


async def _stream_while(url: str, model: str, during) -> str:
    """Stream an answer from `url`, calling `during()` once the first tokens have arrived."""
    body = {"model": model, "messages": QUESTION, "temperature": 0, "max_tokens": 24, "stream": True}
    parts = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async with client.stream("POST", CHAT, json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    parts.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
                    if len(parts) == 3:
                        await during()
    return "".join(parts)


def test_register_replace_and_delete_across_replica_processes(tmp_path, postgres, adapter_root, adapter_dirs):
    with replicas(tmp_path, postgres.new_database(), adapter_root) as [(_, a), (_, b)]:
        registered = httpx.post(f"{a}/v1/adapters", json={"name": "shared", "path": str(adapter_dirs["lora"])})
        assert registered.status_code == 201, registered.text
        old = _answer(a, "shared")
        assert _answer(b, "shared") == old  # B serves A's registration on its next request

        async def replace_on_b() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                replaced = await client.post(f"{b}/v1/adapters", json={"name": "shared", "replace": True,
                                                                        "path": str(adapter_dirs["lora2"])})
                assert replaced.status_code == 201 and replaced.json()["version"] == 2, replaced.text

        assert asyncio.run(_stream_while(a, "shared", replace_on_b)) == old  # A's stream ends on the old version
        until_adapter_card(a, "shared", lambda card: card.get("version") == 2)  # A follows B within a second
        new = _answer(a, "shared")  # and its next request gets the new version
        assert new != old and _answer(b, "shared") == new

        assert httpx.delete(f"{a}/v1/adapters/shared").status_code == 200
        until_adapter_card(b, "shared", lambda card: "error" in card)
        gone = httpx.post(f"{b}{CHAT}", json={"model": "shared", "messages": QUESTION, "max_tokens": 4})
        assert gone.status_code == 404, gone.text
        assert [m["id"] for m in httpx.get(f"{b}/v1/models").json()["data"]] == [MODEL]


def _events(http: httpx.Client, job_id: str) -> list[dict]:
    return http.get(f"{JOBS}/{job_id}/events", params={"limit": 500}).json()["data"][::-1]


def _wait_finished(http: httpx.Client, job_id: str, timeout: float = 400) -> dict:
    deadline = time.monotonic() + timeout
    while (job := http.get(f"{JOBS}/{job_id}").json())["status"] not in {"succeeded", "failed", "cancelled"}:
        assert time.monotonic() < deadline, _events(http, job_id)
        time.sleep(0.5)
    return job


def test_jobs_run_once_each_and_a_killed_replicas_job_resumes_on_another(tmp_path, postgres, adapter_root):
    data = adapter_root / "replicas-train.jsonl"
    shutil.copy(EXAMPLES / "mascot_train.jsonl", data)
    request = {"model": MODEL, "training_file": str(data), "method": {"type": "bottleneck",
                                                                       "hyperparameters": {"n_epochs": 3}}}
    with replicas(tmp_path, postgres.new_database(), adapter_root) as servers:
        by_pid = {proc.pid: (proc, url) for proc, url in servers}
        with httpx.Client(base_url=servers[0][1], timeout=60) as http:
            created = [http.post(JOBS, json=request) for _ in range(3)]
            assert all(c.status_code == 200 for c in created), created[0].text
            job_ids = [c.json()["id"] for c in created]
            # A fourth, cancelled through the other replica before it can run, never runs.
            cancelled = http.post(JOBS, json=request).json()["id"]
            assert httpx.post(f"{servers[1][1]}{JOBS}/{cancelled}/cancel").json()["status"] == "cancelled"
            # A job with a checkpoint is mid-training: kill -9 the replica that runs it.
            deadline, victim = time.monotonic() + 300, None
            while victim is None and time.monotonic() < deadline:
                for job_id in job_ids:
                    if http.get(f"{JOBS}/{job_id}/checkpoints").json()["data"] and \
                            http.get(f"{JOBS}/{job_id}").json()["status"] == "running":
                        victim = job_id
                        break
                time.sleep(0.2)
            assert victim is not None, "no job reached a checkpoint"
            started = [e for e in _events(http, victim) if e["message"] == "Fine-tuning job started"]
            pid = int(started[-1]["data"]["replica"].split(":")[1])
        dead, _ = by_pid.pop(pid)
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()

        (_, survivor), = by_pid.values()
        with httpx.Client(base_url=survivor, timeout=60) as http:
            for job_id in job_ids:
                job = _wait_finished(http, job_id)
                assert job["status"] == "succeeded", _events(http, job_id)
                messages = [e["message"] for e in _events(http, job_id)]
                metrics = tmp_path / "data" / "fine_tuning" / "jobs" / job_id / "metrics.jsonl"
                steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train_loss" in line]
                assert steps == list(range(1, steps[-1] + 1))  # every step once, across the two replicas
                if job_id == victim:
                    assert any("the job's runner stopped" in m for m in messages)
                    assert any("resumed after epoch" in m for m in messages)
                else:  # untouched jobs ran exactly once
                    assert messages.count("Fine-tuning job started") == 1, messages
                assert _answer(survivor, job["fine_tuned_model"])
            job = http.get(f"{JOBS}/{cancelled}").json()
            assert job["status"] == "cancelled" and job["fine_tuned_model"] is None
            assert "Fine-tuning job started" not in [e["message"] for e in _events(http, cancelled)]


def test_a_database_outage_keeps_resident_adapters_serving(tmp_path, postgres, adapter_root, adapter_dirs):
    with replicas(tmp_path, postgres.new_database(), adapter_root, count=1) as [(_, url)]:
        assert httpx.post(f"{url}/v1/adapters", json={"name": "resident", "path": str(adapter_dirs["lora"])}
                          ).status_code == 201
        before = _answer(url, "resident")
        postgres.stop()
        try:
            assert _answer(url, "resident") == before and _answer(url, MODEL)
            ready = httpx.get(f"{url}/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "database_unavailable"
            refused = httpx.post(f"{url}/v1/adapters", json={"name": "later", "path": str(adapter_dirs["lora2"])})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "database_unavailable"
            assert "password" not in refused.text and postgres.url() not in refused.text
            jobs = httpx.get(f"{url}{JOBS}")
            assert jobs.status_code == 503 and jobs.json()["error"]["code"] == "database_unavailable"
        finally:
            postgres.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/ready").status_code != 200:  # recovery needs no restart
            assert time.monotonic() < deadline, "the server did not see the database come back"
            time.sleep(0.5)
        assert httpx.post(f"{url}/v1/adapters", json={"name": "later", "path": str(adapter_dirs["lora2"])}
                          ).status_code == 201
        assert _answer(url, "later") != before


def test_a_database_that_stops_answering_never_stalls_serving(tmp_path, postgres, adapter_root, adapter_dirs):
    """PostgreSQL behind a network that drops packets (a proxy that stops forwarding: no error, no answer): a
    stream of a resident adapter goes on without a pause, and new requests for it are served from the
    registry as last read. Registry reads used to run on the event loop and froze every stream with them."""
    proxy = StallingProxy(postgres.port)
    database = postgres.new_database().replace(f":{postgres.port}/", f":{proxy.port}/")
    body = {"model": "resident", "messages": QUESTION, "temperature": 0, "max_tokens": 64, "stream": True}
    arrivals: list[float] = []
    try:
        with replicas(tmp_path, database, adapter_root, count=1) as [(_, url)]:
            assert httpx.post(f"{url}/v1/adapters", json={"name": "resident", "path": str(adapter_dirs["lora"])}
                              ).status_code == 201
            before = _answer(url, "resident")
            warm_s = min(_seconds(lambda: _answer(url, "resident")) for _ in range(2))
            with ThreadPoolExecutor(1) as pool, httpx.stream("POST", f"{url}{CHAT}", json=body, timeout=60) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        arrivals.append(time.monotonic())
                    if len(arrivals) == 3 and not proxy.is_stalled:
                        proxy.stall()
                        started = time.monotonic()
                        answers = pool.submit(lambda: [_answer(url, "resident") for _ in range(3)])
                assert answers.result() == [before] * 3 and time.monotonic() - started < 15
            # A warm request reads the registry's copy, not the database: no slower than before the stall (it
            # used to wait database.WAIT_S, 0.5 s, for each), and the event loop answers at once.
            stalled_s = min(_seconds(lambda: _answer(url, "resident")) for _ in range(2))
            assert stalled_s < warm_s + 0.25, (stalled_s, warm_s)
            assert max(_seconds(lambda: httpx.get(f"{url}/health")) for _ in range(10)) < 0.1
            for _ in range(8):  # each probe waits its bounded time; none leaves a thread behind to exhaust the pool
                ready = httpx.get(f"{url}/ready", timeout=5)
                assert ready.status_code == 503 and ready.json()["status"] == "database_unavailable"
            assert _answer(url, "resident") == before
        gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
        assert len(arrivals) > 60 and max(gaps) < 2.0, max(gaps)
    finally:
        proxy.close()


def test_a_replica_that_loses_its_claim_stops_training_and_leaves_the_status(tmp_path, adapter_root):
    """Another replica took the job over (the claim expired, e.g. the database was out of reach past it):
    this one stops its training process and does not mark the job failed; the job goes on where it is held."""
    data = adapter_root / "lost-claim-train.jsonl"
    shutil.copy(EXAMPLES / "mascot_train.jsonl", data)
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    store = JobStore(Database(url))
    dirs = {"data_dir": tmp_path / "data", "adapter_roots": [adapter_root],
            "database_url": url}
    with running_server(**dirs) as server, httpx.Client(base_url=server, timeout=60) as http:
        job = http.post(JOBS, json={"model": MODEL, "training_file": str(data), "method": {
            "type": "bottleneck", "hyperparameters": {"n_epochs": 4}}}).json()
        deadline = time.monotonic() + 120
        while not http.get(f"{JOBS}/{job['id']}/checkpoints").json()["data"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with store.db.write() as connection:  # a replica elsewhere holds the job now
            connection.execute(update(jobs).where(jobs.c.id == job["id"])
                               .values(runner="elsewhere", claim_expires_at=time.time() + 3600))
        log = tmp_path / "data" / "fine_tuning" / "jobs" / job["id"] / "metrics.jsonl"
        deadline = time.monotonic() + 30
        while True:  # the training process stops within one renewal (5 s)
            size = log.stat().st_size
            time.sleep(3)
            if log.stat().st_size == size:
                break
            assert time.monotonic() < deadline, "training went on after the claim was lost"
        assert http.get(f"{JOBS}/{job['id']}").json()["status"] == "running"
        store.release(job["id"], "elsewhere")  # that replica stopped: this one takes the job back
        done = _wait_finished(http, job["id"])
        assert done["status"] == "succeeded", _events(http, job["id"])
        assert any("resumed after epoch" in e["message"] for e in _events(http, job["id"]))
