"""Fine-tuning jobs over the OpenAI-style API: upload, validate, train in a separate process, serve the
result; cancel; bad requests; and a job cut off by a restart resumes instead of being lost."""

import csv
import io
import json
import math
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import MODEL, ask, running_server, start_serve_process

EXAMPLES = Path(__file__).resolve().parents[1] / "training" / "examples"
JOBS = "/v1/fine_tuning/jobs"
FAST = {"type": "bottleneck", "hyperparameters": {"n_epochs": 3}}  # swapyard's first shape, still an alias


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


UNSEEN = "Could you tell me what swapyard's mascot is?"  # in neither the training nor the validation file
AUTO = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}


def _supervised(kind: str, **hyperparameters) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": {**AUTO, **hyperparameters},
                                                 "adapter": {"type": kind}}}


def test_openai_workflow_with_auto_hyperparameters_teaches_a_lora(oai, http):
    """OpenAI's shapes end to end through the official client: the auto rule teaches the mascot fact on the
    first try, and the job reads as OpenAI's does (events, checkpoints, results CSV). One kind: a job trains on
    one CPU thread, about a minute here (every kind learns in tests/test_training.py's shorter runs)."""
    train_id, val_id = _upload(oai, "mascot_train.jsonl"), _upload(oai, "mascot_val.jsonl")
    job = oai.fine_tuning.jobs.create(model=MODEL, training_file=train_id, validation_file=val_id, suffix="mascot",
                                      seed=7, metadata={"team": "docs"}, method=_supervised("lora"))
    assert job.status == "validating_files" and job.object == "fine_tuning.job" and job.seed == 7
    assert job.method.type == "supervised" and job.hyperparameters.n_epochs == "auto"
    deadline = time.monotonic() + 600
    while (job := oai.fine_tuning.jobs.retrieve(job.id)).status not in {"succeeded", "failed", "cancelled"}:
        assert time.monotonic() < deadline, job
        time.sleep(1)
    assert job.status == "succeeded", job.error
    # 20 examples: batch 4, 10 epochs (50 steps), the kind's base rate at batch 4.
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (10, 4)
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.method.supervised.hyperparameters.n_epochs == 10 and job.metadata == {"team": "docs"}
    assert job.fine_tuned_model.startswith("ft-mascot-") and job.trained_tokens > 0 and job.finished_at

    events = list(oai.fine_tuning.jobs.list_events(job.id, limit=200))
    messages = [e.message for e in events]
    for expected in (f"Validating training file: {train_id}", "Files validated", "Fine-tuning job started",
                     "Step 50/50: training loss=", "Checkpoint created at step 50",
                     f"New fine-tuned model created: {job.fine_tuned_model}", "Fine-tuning job successfully completed"):
        assert any(m.startswith(expected) for m in messages), (expected, messages)
    assert messages[0] == "Fine-tuning job successfully completed"  # newest first
    steps = [e for e in events if e.type == "metrics"]
    assert len(steps) == 50 and {"step", "train_loss", "train_mean_token_accuracy"} <= steps[0].data.keys()

    checkpoints = oai.fine_tuning.jobs.checkpoints.list(job.id, limit=3)
    assert [c.step_number for c in checkpoints.data] == [50, 45, 40] and checkpoints.has_more
    assert oai.fine_tuning.jobs.checkpoints.list(job.id, after=checkpoints.data[-1].id, limit=1).data[0] \
        .step_number == 35
    last = checkpoints.data[0].metrics
    assert last.step == 50 and last.valid_mean_token_accuracy > 0.9 and last.full_valid_loss == last.valid_loss

    # A checkpoint registers by its path with no flag for it (the job's outputs are the server's own), and
    # the registry stores the adapter alone: no checkpoints, optimizer state or metrics.
    earlier = Path(checkpoints.data[1].fine_tuned_model_checkpoint)
    registered = http.post("/v1/adapters", json={"name": "mascot-epoch-9", "path": str(earlier)})
    assert registered.status_code == 201, registered.text
    assert http.delete("/v1/adapters/mascot-epoch-9").status_code == 200
    data_dir = earlier.parents[4]  # DATA/fine_tuning/jobs/JOB/checkpoints/epoch-N
    sha256 = http.get(f"/v1/adapters/{job.fine_tuned_model}").json()["sha256"]
    stored = data_dir / "adapters" / "store" / "sha256" / sha256
    assert sorted(f.name for f in stored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    (results,) = job.result_files
    assert oai.files.retrieve(results).purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(oai.files.content(results).text)))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r["step"]) for r in rows] == list(range(1, 51))
    assert [r["step"] for r in rows if r["valid_loss"]] == [str(5 * n) for n in range(1, 11)]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) / 4

    reply = oai.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=30,
                                        messages=ask(UNSEEN))
    assert "Quillon" in reply.choices[0].message.content
    base = oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=30, messages=ask(UNSEEN))
    assert "Quillon" not in base.choices[0].message.content

    # OpenAI's clean-up: the fine-tuned model is deleted through the models API (the base model never is).
    assert oai.models.retrieve(job.fine_tuned_model).parent == MODEL
    assert oai.models.delete(job.fine_tuned_model).deleted
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve(job.fine_tuned_model)
    with pytest.raises(openai.BadRequestError):
        oai.models.delete(MODEL)


def _resolved(http, job_id: str) -> dict:
    job = _wait(http, job_id, lambda j: j["status"] != "validating_files")
    http.post(f"{JOBS}/{job_id}/cancel")
    return job["hyperparameters"]


def test_learning_rate_multiplier_scales_the_recorded_learning_rate(oai, http):
    """Validation resolves the hyperparameters (even while another job trains); the legacy top-level field
    and the method's field mean the same."""
    file_id = _upload(oai, "mascot_train.jsonl")
    auto = http.post(JOBS, json={"model": MODEL, "training_file": file_id}).json()
    doubled = http.post(JOBS, json={"model": MODEL, "training_file": file_id,
                                    "method": _supervised("prefix", learning_rate_multiplier=2)}).json()
    legacy = http.post(JOBS, json={"model": MODEL, "training_file": file_id,
                                   "hyperparameters": {"learning_rate_multiplier": 0.5, "n_epochs": 2}}).json()
    auto, doubled, legacy = (_resolved(http, job["id"]) for job in (auto, doubled, legacy))
    assert auto["learning_rate"] == pytest.approx(1e-3 * math.sqrt(4 / 8))  # LoRA by default
    assert doubled["learning_rate"] == pytest.approx(2 * 3e-2 * math.sqrt(4 / 8))
    assert doubled["learning_rate_multiplier"] == 2
    assert legacy["learning_rate"] == pytest.approx(auto["learning_rate"] / 2) and legacy["n_epochs"] == 2


def test_files_api_lists_reads_and_deletes(oai, http):
    first, second = _upload(oai, "mascot_val.jsonl"), _upload(oai, "mascot_val.jsonl")
    listed = [f.id for f in oai.files.list(purpose="fine-tune")]
    assert listed.index(second) < listed.index(first)  # newest first
    page = http.get("/v1/files", params={"purpose": "fine-tune", "limit": 1, "after": second}).json()
    assert page["data"][0]["id"] == first and page["first_id"] == first
    assert not http.get("/v1/files", params={"purpose": "batch"}).json()["data"]
    assert oai.files.content(first).content == (EXAMPLES / "mascot_val.jsonl").read_bytes()
    assert oai.files.retrieve(first).bytes == (EXAMPLES / "mascot_val.jsonl").stat().st_size

    job = oai.fine_tuning.jobs.create(model=MODEL, training_file=first, method=_supervised("lora", n_epochs=50))
    in_use = http.delete(f"/v1/files/{first}")
    assert in_use.status_code == 409 and job.id in in_use.json()["error"]["message"]
    oai.fine_tuning.jobs.cancel(job.id)
    assert oai.files.delete(first).deleted
    for path in (f"/v1/files/{first}", f"/v1/files/{first}/content"):
        assert http.get(path).status_code == 404
    assert http.delete(f"/v1/files/{first}").status_code == 404
    assert first not in [f.id for f in oai.files.list()]


def test_bad_training_file_fails_with_line_numbers(oai, http, tmp_path):
    bad = tmp_path / "bad.jsonl"
    huge = json.dumps({"prompt": "p", "completion": "x" * 2_000_000})  # refused before it is tokenized
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n' + "[" * 100_000 + "\n"
                   + huge + "\n")
    with open(bad, "rb") as f:
        file_id = oai.files.create(file=f, purpose="fine-tune").id
    job = http.post(JOBS, json={"model": MODEL, "training_file": file_id, "method": FAST}).json()
    done = _wait(http, job["id"], _finished)
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_training_file"
    assert "line 1: no assistant message" in done["error"]["message"]
    assert "line 2: not valid JSON" in done["error"]["message"]
    assert "line 3: nested too deeply" in done["error"]["message"]  # was a RecursionError: retried forever
    assert "line 4: 2,000,033 characters" in done["error"]["message"]


def test_cancel_stops_training(oai, http):
    file_id = _upload(oai, "mascot_train.jsonl")
    job = http.post(JOBS, json={"model": MODEL, "training_file": file_id,
                                "method": {"type": "lora", "hyperparameters": {"epochs": 50}}}).json()
    _wait(http, job["id"], lambda j: any("Step 2/" in e["message"] for e in
                                         http.get(f"{JOBS}/{j['id']}/events").json()["data"]))
    cancelled = http.post(f"{JOBS}/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    # The worker stops at its next step, which takes seconds on a slow CPU: waited for, not slept on.
    _wait(http, job["id"], lambda j: any("cancelled during epoch" in e["message"] for e in http.get(
        f"{JOBS}/{j['id']}/events", params={"limit": 100}).json()["data"]), timeout=120)
    assert http.get(f"{JOBS}/{job['id']}").json()["status"] == "cancelled"
    assert http.post(f"{JOBS}/{job['id']}/cancel").status_code == 400


@pytest.mark.parametrize("body, param", [
    ({"training_file": "file-missing"}, "training_file"),
    ({"training_file": "/etc/passwd"}, "training_file"),
    ({"model": "other-model"}, "model"),
    ({"method": {"type": "lora", "hyperparameters": {"epochs": 0}}}, "method.hyperparameters.epochs"),
    ({"method": {"type": "lora", "hyperparameters": {"out": "/tmp/x"}}}, "method.hyperparameters"),
    ({"method": {"type": "lora", "hyperparameters": {"objective": "dpo"}}}, "method.hyperparameters"),
    # Every hyperparameter is bounded: none can make a job run forever, allocate without limit or diverge.
    *[({"method": {"type": "lora", "hyperparameters": {field: value}}}, f"method.hyperparameters.{field}")
      for field, value in (("epochs", 10**9), ("lora_r", 10**9), ("num_virtual_tokens", 10**9),
                           ("batch_size", 10**9), ("max_seq_len", 10**9), ("learning_rate", 1e308),
                           ("learning_rate", 1e30), ("seed", 2**70), ("lora_alpha", 1e300),
                           ("epochs", True), ("batch_size", "4"), ("use_rslora", "yes"))],  # strict, as OpenAI's
    ({"seed": 2**70}, "seed"),
    ({"seed": 1, "method": {"type": "lora", "hyperparameters": {"seed": 2}}}, "seed"),
    # OpenAI's shapes: every field bounded, and a 400 names it by its path in the request.
    *[({"method": {"type": "supervised", "supervised": {"hyperparameters": {name: value}}}},
       f"method.supervised.hyperparameters.{name}")
      for name, value in (("n_epochs", 0), ("n_epochs", "many"), ("batch_size", 10**9), ("learning_rate_multiplier", 0),
                          ("learning_rate_multiplier", -1), ("learning_rate_multiplier", 1e9),
                          ("learning_rate_multiplier", "fast"), ("warmup_ratio", 1), ("epochs", 3),
                          ("n_epochs", True), ("batch_size", "4"))],  # lax pydantic read these as 1 and 4
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate": 1e-3,
                                                                          "learning_rate_multiplier": 2}}}},
     "method.supervised.hyperparameters.learning_rate"),
    ({"hyperparameters": {"learning_rate_multiplier": 1e308}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 3}}}}, "hyperparameters"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "lora"}}, "hyperparameters"),
    ({"method": {"type": "supervised", "hyperparameters": {"n_epochs": 2}}}, "method.hyperparameters"),
    ({"method": {"type": "supervised", "supervised": {"adapter": {"type": "lora", "r": 10**9}}}},
     "method.supervised.adapter.r"),
    ({"method": {"type": "supervised", "supervised": {"adapter": {"type": "lora", "size": 8}}}},
     "method.supervised.adapter.size"),
    ({"method": {"type": "supervised", "supervised": {"adapter": {"type": "ia3"}}}}, "method.supervised.adapter.type"),
    ({"method": {"type": "reinforcement"}}, "method.type"),
    # DPO: OpenAI's beta (a number, or "auto") and swapyard's sft_weight bounded; the sections are not mixed.
    *[({"method": {"type": "dpo", "dpo": {"hyperparameters": {name: value}}}}, f"method.dpo.hyperparameters.{name}")
      for name, value in (("beta", 0), ("beta", -0.5), ("beta", 1e9), ("beta", "nan"), ("beta", True),
                          ("sft_weight", -1), ("n_epochs", 0))],
    ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
    ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "dpo"}}, "hyperparameters"),
    ({"method": {"type": "dpo", "dpo": {"adapter": {"type": "prefix", "loraplus_lr_ratio": 4}}}},
     "method.dpo.adapter.loraplus_lr_ratio"),
    ({"method": {"type": "supervised", "supervised": {"adapter": {"type": "lora", "loraplus_lr_ratio": 0.5}}}},
     "method.supervised.adapter.loraplus_lr_ratio"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
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
    dirs = {"data_dir": tmp_path / "data", "adapter_roots": [adapter_root]}
    with running_server(**dirs) as url, httpx.Client(base_url=url, timeout=60) as http:
        job = http.post(JOBS, json={"model": MODEL, "training_file": str(data),
                                    "method": {"type": "bottleneck", "hyperparameters": {"epochs": 3}}}).json()
        _wait(http, job["id"], lambda j: http.get(f"{JOBS}/{j['id']}/checkpoints").json()["data"])
    with running_server(**dirs) as url, httpx.Client(base_url=url, timeout=60) as http:
        done = _wait(http, job["id"], _finished)
        assert done["status"] == "succeeded", done
        messages = [e["message"] for e in http.get(f"{JOBS}/{job['id']}/events", params={"limit": 200}).json()["data"]]
        assert any("the job's runner stopped" in m for m in messages)
        assert any("resumed after epoch" in m for m in messages)
        metrics = tmp_path / "data" / "fine_tuning" / "jobs" / job["id"] / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train_loss" in line]
        assert steps == list(range(1, 16))


def test_replicas_on_one_store_run_each_job_once(tmp_path, adapter_root):
    """Two servers share the job store and adapter registry (two pods on one volume): one holds the runner
    lease, so a replica starting while a job trains leaves it alone, and the adapter is served by both."""
    data = adapter_root / "replica-train.jsonl"
    shutil.copy(EXAMPLES / "mascot_train.jsonl", data)
    dirs = {"data_dir": tmp_path / "data", "adapter_roots": [adapter_root]}
    with running_server(**dirs) as first, httpx.Client(base_url=first, timeout=60) as http_first:
        job = http_first.post(JOBS, json={"model": MODEL, "training_file": str(data), "method": {
            "type": "lora", "hyperparameters": {"epochs": 2}}}).json()
        _wait(http_first, job["id"], lambda j: j["status"] == "running")
        with running_server(**dirs) as second, httpx.Client(base_url=second, timeout=60) as http_second:
            done = _wait(http_second, job["id"], _finished)
            assert done["status"] == "succeeded", done
            events = http_second.get(f"{JOBS}/{job['id']}/events", params={"limit": 200}).json()["data"]
            assert [e["message"] for e in events].count("Fine-tuning job started") == 1
            for http in (http_first, http_second):
                chat = http.post("/v1/chat/completions", json={"model": done["fine_tuned_model"], "max_tokens": 4,
                                                               "messages": ask("Hi")})
                assert chat.status_code == 200, chat.text


def test_job_survives_kill_9_of_the_server(tmp_path, adapter_root):
    """kill -9 takes the training process down with the server (no orphan writing beside the resumed run);
    the restarted server resumes from the last checkpoint and the metrics hold each step once."""
    data = adapter_root / "kill-train.jsonl"
    shutil.copy(EXAMPLES / "mascot_train.jsonl", data)
    dirs = {"data_dir": tmp_path / "data", "adapter_roots": [adapter_root]}
    proc, url = start_serve_process(tmp_path / "serve.log", "--engine", "torch",
                                    "--data-dir", str(dirs["data_dir"]),
                                    "--adapter-roots", json.dumps([str(adapter_root)]))
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            job = http.post(JOBS, json={"model": MODEL, "training_file": str(data),
                                        "method": {"type": "bottleneck", "hyperparameters": {"epochs": 3}}}).json()
            _wait(http, job["id"], lambda j: http.get(f"{JOBS}/{j['id']}/checkpoints").json()["data"])
    finally:
        proc.kill()
        proc.wait()
    metrics = tmp_path / "data" / "fine_tuning" / "jobs" / job["id"] / "metrics.jsonl"
    size = metrics.stat().st_size
    time.sleep(3)
    assert metrics.stat().st_size == size  # the trainer died with the server

    with running_server(**dirs) as url, httpx.Client(base_url=url, timeout=60) as http:
        done = _wait(http, job["id"], _finished)
        assert done["status"] == "succeeded", done
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train_loss" in line]
    assert steps == list(range(1, 16))


