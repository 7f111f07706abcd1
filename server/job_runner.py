"""Runs fine-tuning jobs one at a time, each in its own process, and registers what they train.

Lifecycle: validating_files -> queued -> running -> succeeded | failed | cancelled. Replicas sharing one
job store elect one runner through a lease in the database (renewed every LEASE_TTL_S / 3); the others
accept jobs and leave them to it. A runner that takes the lease over (at start-up, or after the holder
died) queues the jobs left `running` again, and they resume from their last checkpoint.
"""

import asyncio
import json
import logging
import multiprocessing
import re
import time
import uuid
from pathlib import Path

from adapters.base import AdapterError
from server.adapter_manager import AdapterManager
from training.config import TrainConfig
from training.data import DataError, read_examples
from training.hyperparameters import resolve
from training.jobs import FileRecord, JobRecord, JobStore, new_id
from training.report import RESULTS_FILE
from training.worker import SUMMARY_FILE, run_job

log = logging.getLogger(__name__)

LEASE, LEASE_TTL_S = "job-runner", 15.0


def adapter_name(job: JobRecord) -> str:
    """What the trained adapter is served as: ft-[suffix-]<last 8 of the job id>."""
    suffix = re.sub(r"[^A-Za-z0-9._-]", "-", job.suffix or "")[:40]
    return f"ft-{suffix + '-' if suffix else ''}{job.id[-8:]}"


class JobRunner:
    def __init__(self, store: JobStore, adapters: AdapterManager, num_threads: int | None):
        self.store, self.adapters, self.num_threads = store, adapters, num_threads
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._training: asyncio.Task | None = None  # the job now training, while the loop validates new ones
        self._process: multiprocessing.Process | None = None
        self._stopping = False
        self._holder = uuid.uuid4().hex  # this runner, in the lease table
        self.is_leader = False
        self._leasing: asyncio.Task | None = None

    async def start(self) -> None:
        self._leasing = asyncio.create_task(self._keep_lease())
        self._task = asyncio.create_task(self._loop())

    async def shutdown(self) -> None:
        """Stop training; a job cut off here stays `running` and resumes under the next lease holder."""
        self._stopping = True
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
        for task in (self._task, self._leasing, self._training):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.is_leader:  # another replica (or this one restarted) takes over at once
            self.store.release_lease(LEASE, self._holder)

    async def _keep_lease(self) -> None:
        while not self._stopping:
            try:
                held = self.store.hold_lease(LEASE, self._holder, LEASE_TTL_S)
            except Exception:  # e.g. the database is locked for longer than its timeout: try again
                log.exception("could not renew the job-runner lease")
                held = None
            if held == "acquired":
                for job in self.store.jobs_with_status("running"):
                    self.store.set_status(job.id, "queued")
                    self.store.add_event(job.id, "info", "the job's runner stopped; it resumes from its last "
                                                         "checkpoint")
                self._wake.set()
            elif held is None and self.is_leader and self._process is not None:
                # Lost the lease (renewals failed past its expiry): the new holder runs this job now.
                log.error("lost the job-runner lease; stopping the training process")
                self._process.terminate()
            self.is_leader = held is not None
            await asyncio.sleep(LEASE_TTL_S / 3)

    def submit(self, job: JobRecord) -> None:
        self.store.add_job(job)
        self.store.add_event(job.id, "info", f"Created fine-tuning job: {job.id}")
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """The worker sees the status at its next step and stops; a queued job never starts."""
        self.store.set_status(job_id, "cancelled")
        self.store.add_event(job_id, "info", "Fine-tuning job cancelled")

    async def _loop(self) -> None:
        while not self._stopping:
            if self.is_leader:  # else another replica runs the jobs
                for job in self.store.jobs_with_status("validating_files"):
                    await self._validate(job)
                queued = self.store.jobs_with_status("queued")
                if queued and (self._training is None or self._training.done()):
                    self._training = asyncio.create_task(self._train(queued[0]))
                    self._training.add_done_callback(lambda _: self._wake.set())
            await self._idle()

    async def _train(self, job: JobRecord) -> None:
        try:
            await self._run(job)
        except Exception as exc:  # one broken job must not stop the queue behind it
            log.exception("fine-tuning job %s failed", job.id)
            self.store.set_status(job.id, "failed", error={"code": "server_error", "message": str(exc), "param": None})

    async def _idle(self) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=5)
        except TimeoutError:
            pass

    async def _validate(self, job: JobRecord) -> None:
        """Check the files, then resolve the "auto" hyperparameters from the training set's size."""
        num_examples = 0
        for param, label in (("training_file", "training"), ("validation_file", "validation")):
            path = job.config["data" if param == "training_file" else "validation"]
            if path is None:
                continue
            self.store.add_event(job.id, "info", f"Validating {label} file: {getattr(job, param)}")
            try:
                examples, warnings = await asyncio.to_thread(read_examples, Path(path))
            except DataError as exc:
                error = {"code": f"invalid_{param}", "message": str(exc), "param": param}
                self.store.set_status(job.id, "failed", error=error)
                self.store.add_event(job.id, "error", str(exc))
                return
            for warning in warnings:
                self.store.add_event(job.id, "warn", warning)
            num_examples = num_examples or len(examples)
        hyperparameters = resolve(TrainConfig.model_validate(job.config), num_examples).model_dump()
        if self.store.status(job.id) == "validating_files":
            self.store.set_status(job.id, "queued", hyperparameters=hyperparameters)
            self.store.add_event(job.id, "info", f"Files validated ({num_examples} training examples), moving job "
                                                 "to queued state", {"hyperparameters": hyperparameters})

    async def _run(self, job: JobRecord) -> None:
        self.store.set_status(job.id, "running")
        self.store.add_event(job.id, "info", "Fine-tuning job started")
        # spawn, not fork: the server's threads (engine, event loop) must not be copied into the child.
        self._process = multiprocessing.get_context("spawn").Process(
            target=run_job, args=(str(self.store.path), job.id, self.num_threads), name=f"swapyard-{job.id}")
        self._process.start()
        await asyncio.to_thread(self._process.join)
        exit_code, self._process = self._process.exitcode, None
        if self._stopping or self.store.status(job.id) == "cancelled":
            return
        if exit_code != 0:
            last_error = next((e for e in self.store.events(job.id, None, 50) if e.level == "error"), None)
            message = last_error.message if last_error else f"the training process exited with code {exit_code}"
            code = (last_error.data or {}).get("code", "training_error") if last_error else "training_error"
            self.store.set_status(job.id, "failed", error={"code": code, "message": message, "param": None})
            return
        await self._register(job)

    async def _register(self, job: JobRecord) -> None:
        out = Path(job.config["out"])
        summary = json.loads((out / SUMMARY_FILE).read_text())
        name = adapter_name(job)
        try:
            await self.adapters.register(name, out, source=f"fine-tune:{job.id}", replace=False, is_pinned=False)
        except AdapterError as exc:
            self.store.set_status(job.id, "failed", error={"code": "registration_failed", "message": str(exc),
                                                           "param": None})
            return
        self.store.add_event(job.id, "info", f"New fine-tuned model created: {name}", summary)
        results = out / RESULTS_FILE
        record = FileRecord(id=new_id("file"), filename="step_metrics.csv", bytes=results.stat().st_size,
                            purpose="fine-tune-results", path=str(results), created_at=int(time.time()))
        self.store.add_file(record)
        self.store.set_status(job.id, "succeeded", fine_tuned_model=name, trained_tokens=summary["trained_tokens"],
                              result_files=[record.id])
        self.store.add_event(job.id, "info", "Fine-tuning job successfully completed")
