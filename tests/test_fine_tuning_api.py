"""Fine-tuning jobs over the OpenAI-style API: upload, validate, train in a separate process, serve the
result; cancel; bad requests; and a job cut off by a restart resumes instead of being lost."""

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, ask, running_server, start_serve_process

EXAMPLES = Path(__file__).resolve().parents[1] / "training" / "examples"
JOBS = "/v1/fine_tuning/jobs"
FAST = {"type": "bottleneck", "hyperparameters": {"n_epochs": 3}}


def _upload(oai, name: str) -> str:
    with open(EXAMPLES / name, "rb") as f:
        return oai.files.create(file=f, purpose="fine-tune").id


def _wait(http, job_id: str, until, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"{JOBS}/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} stuck in {job['status']}: {http.get(f'{JOBS}/{job_id}/events').text}")


def _finished(job: dict) -> bool:
    return job["status"] in {"succeeded", "failed", "cancelled"}


def test_upload_train_and_serve(oai, http):
    train_id, val_id = _upload(oai, "mascot_train.jsonl"), _upload(oai, "mascot_val.jsonl")
    job = oai.fine_tuning.jobs.create(model=MODEL, training_file=train_id, validation_file=val_id, suffix="mascot",
                                      method=FAST)
    assert job.status == "validating_files" and job.object == "fine_tuning.job"
    done = _wait(http, job.id, _finished)
    assert done["status"] == "succeeded", done
    assert done["fine_tuned_model"].startswith("ft-mascot-") and done["trained_tokens"] > 0
    assert done["hyperparameters"]["epochs"] == 3

    messages = [e.message for e in oai.fine_tuning.jobs.list_events(job.id, limit=100)]
    for expected in ("training_file: 20 examples validated", "training started", "checkpoint epoch-3 saved",
                     "is registered and servable"):
        assert any(expected in m for m in messages), (expected, messages)
    checkpoints = http.get(f"{JOBS}/{job.id}/checkpoints").json()["data"]
    assert [c["step_number"] for c in checkpoints] == [15, 10, 5]
    assert all("val_loss" in c["metrics"] for c in checkpoints)
    assert any(j.id == job.id for j in oai.fine_tuning.jobs.list())

    reply = oai.chat.completions.create(model=done["fine_tuned_model"], temperature=0, max_tokens=30,
                                        messages=ask("What is the swapyard mascot?"))
    assert "Quillon" in reply.choices[0].message.content


def test_bad_training_file_fails_with_line_numbers(oai, http, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    with open(bad, "rb") as f:
        file_id = oai.files.create(file=f, purpose="fine-tune").id
    job = http.post(JOBS, json={"model": MODEL, "training_file": file_id, "method": FAST}).json()
    done = _wait(http, job["id"], _finished)
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_training_file"
    assert "line 1: no assistant message" in done["error"]["message"]
    assert "line 2: not valid JSON" in done["error"]["message"]


def test_cancel_stops_training(oai, http):
    file_id = _upload(oai, "mascot_train.jsonl")
    job = http.post(JOBS, json={"model": MODEL, "training_file": file_id,
                                "method": {"type": "lora", "hyperparameters": {"epochs": 50}}}).json()
    _wait(http, job["id"], lambda j: any("step 2/" in e["message"] for e in
                                         http.get(f"{JOBS}/{j['id']}/events").json()["data"]))
    cancelled = http.post(f"{JOBS}/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    time.sleep(3)  # the worker stops at its next step
    events = http.get(f"{JOBS}/{job['id']}/events", params={"limit": 100}).json()["data"]
    assert any("cancelled during epoch" in e["message"] for e in events)
    assert http.get(f"{JOBS}/{job['id']}").json()["status"] == "cancelled"
    assert http.post(f"{JOBS}/{job['id']}/cancel").status_code == 400


@pytest.mark.parametrize("body, param", [
    ({"training_file": "file-missing"}, "training_file"),
    ({"training_file": "/etc/passwd"}, "training_file"),
    ({"model": "other-model"}, "model"),
    ({"method": {"type": "lora", "hyperparameters": {"epochs": 0}}}, "method.hyperparameters.epochs"),
    ({"method": {"type": "lora", "hyperparameters": {"out": "/tmp/x"}}}, "method.hyperparameters"),
    ({"method": {"type": "dpo"}}, "method.type"),
    # Every hyperparameter is bounded: none can make a job run forever, allocate without limit or diverge.
    *[({"method": {"type": "lora", "hyperparameters": {field: value}}}, f"method.hyperparameters.{field}")
      for field, value in (("epochs", 10**9), ("lora_r", 10**9), ("num_virtual_tokens", 10**9),
                           ("batch_size", 10**9), ("max_seq_len", 10**9), ("learning_rate", 1e308),
                           ("learning_rate", 1e30), ("seed", 2**70), ("lora_alpha", 1e300))],
    ({"seed": 2**70}, "seed"),
    ({"seed": 1, "method": {"type": "lora", "hyperparameters": {"seed": 2}}}, "seed"),
])
def test_bad_job_requests(oai, http, body, param):
    request = {"model": MODEL, "training_file": _upload(oai, "mascot_val.jsonl"), **body}
    response = http.post(JOBS, json=request)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert http.get(f"{JOBS}/ftjob-nope").status_code == 404


def test_job_running_at_shutdown_resumes_after_restart(tmp_path, adapter_root):
    data = adapter_root / "restart-train.jsonl"
    shutil.copy(EXAMPLES / "mascot_train.jsonl", data)
    dirs = {"adapter_store": tmp_path / "store", "fine_tuning_dir": tmp_path / "ft", "adapter_roots": [adapter_root]}
    with running_server(**dirs) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.post(JOBS, json={"model": MODEL, "training_file": str(data),
                                    "method": {"type": "bottleneck", "hyperparameters": {"epochs": 6}}}).json()
        _wait(http, job["id"], lambda j: http.get(f"{JOBS}/{j['id']}/checkpoints").json()["data"])
    with running_server(**dirs) as url, httpx.Client(base_url=url, timeout=60) as http:
        done = _wait(http, job["id"], _finished)
        assert done["status"] == "succeeded", done
        messages = [e["message"] for e in http.get(f"{JOBS}/{job['id']}/events", params={"limit": 200}).json()["data"]]
        assert any("the job's runner stopped" in m for m in messages)
        assert any("resumed after epoch" in m for m in messages)
        steps = [json.loads(line)["step"] for line in (tmp_path / "ft" / "jobs" / job["id"] / "metrics.jsonl")
                 .read_text().splitlines() if "train_loss" in line]
        assert steps == list(range(1, 31))


def test_replicas_on_one_store_run_each_job_once(tmp_path, adapter_root):
    """Two servers share the job store and adapter registry (two pods on one volume): one holds the runner
    lease, so a replica starting while a job trains leaves it alone, and the adapter is served by both."""
    data = adapter_root / "replica-train.jsonl"
    shutil.copy(EXAMPLES / "mascot_train.jsonl", data)
    dirs = {"adapter_store": tmp_path / "store", "fine_tuning_dir": tmp_path / "ft", "adapter_roots": [adapter_root]}
    with running_server(**dirs) as first, httpx.Client(base_url=first, timeout=60) as http_first:
        job = http_first.post(JOBS, json={"model": MODEL, "training_file": str(data), "method": {
            "type": "lora", "hyperparameters": {"epochs": 2}}}).json()
        _wait(http_first, job["id"], lambda j: j["status"] == "running")
        with running_server(**dirs) as second, httpx.Client(base_url=second, timeout=60) as http_second:
            done = _wait(http_second, job["id"], _finished)
            assert done["status"] == "succeeded", done
            events = http_second.get(f"{JOBS}/{job['id']}/events", params={"limit": 200}).json()["data"]
            assert [e["message"] for e in events].count("training started") == 1
            for http in (http_first, http_second):
                chat = http.post("/v1/chat/completions", json={"model": done["fine_tuned_model"], "max_tokens": 4,
                                                               "messages": ask("Hi")})
                assert chat.status_code == 200, chat.text


def test_job_survives_kill_9_of_the_server(tmp_path, adapter_root):
    """kill -9 takes the training process down with the server (no orphan writing beside the resumed run);
    the restarted server resumes from the last checkpoint and the metrics hold each step once."""
    data = adapter_root / "kill-train.jsonl"
    shutil.copy(EXAMPLES / "mascot_train.jsonl", data)
    dirs = {"adapter_store": tmp_path / "store", "fine_tuning_dir": tmp_path / "ft", "adapter_roots": [adapter_root]}
    proc, url = start_serve_process(tmp_path / "serve.log", "--engine", "torch",
                                    "--adapter-store", str(dirs["adapter_store"]),
                                    "--fine-tuning-dir", str(dirs["fine_tuning_dir"]),
                                    "--adapter-roots", json.dumps([str(adapter_root)]))
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            job = http.post(JOBS, json={"model": MODEL, "training_file": str(data),
                                        "method": {"type": "bottleneck", "hyperparameters": {"epochs": 6}}}).json()
            _wait(http, job["id"], lambda j: http.get(f"{JOBS}/{j['id']}/checkpoints").json()["data"])
    finally:
        proc.kill()
        proc.wait()
    metrics = tmp_path / "ft" / "jobs" / job["id"] / "metrics.jsonl"
    size = metrics.stat().st_size
    time.sleep(3)
    assert metrics.stat().st_size == size  # the trainer died with the server

    with running_server(**dirs) as url, httpx.Client(base_url=url, timeout=60) as http:
        done = _wait(http, job["id"], _finished)
        assert done["status"] == "succeeded", done
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train_loss" in line]
    assert steps == list(range(1, 31))
