"""Runs fine-tuning jobs one at a time, each in its own process, and registers what they train.

Lifecycle: validating_files -> queued -> running -> succeeded | failed | cancelled. Replicas sharing one
database each train one job at a time: a replica claims a job (validating or queued) before working on
it and renews its claims every CLAIM_TTL_S / 3. A job still `running` whose claim was released (its
server stopped) or expired (its server died) is claimed by the next replica with room, and resumes
from its last checkpoint.
"""

import asyncio
import json
import logging
import multiprocessing
import os
import re
import socket
import time
import uuid
from pathlib import Path

from adapters.base import AdapterError
from server.adapter_manager import AdapterManager
from training.config import TrainConfig
from training.data import DataError, read_examples
from training.hyperparameters import resolve
from training.jobs import FileRecord, JobRecord, JobStore, new_id
from training.preferences import read_preferences
from training.report import RESULTS_FILE
from training.worker import SUMMARY_FILE, run_job

log = logging.getLogger(__name__)

CLAIM_TTL_S = 15.0


def adapter_name(job: JobRecord) -> str:
    """What the trained adapter is served as: ft-[suffix-]<last 8 of the job id>."""
    suffix = re.sub(r"[^A-Za-z0-9._-]", "-", job.suffix or "")[:40]
    return f"ft-{suffix + '-' if suffix else ''}{job.id[-8:]}"


class _OffTheLoop:
    """A job store whose methods run in a worker thread: the database may be slow or unreachable, and the
    event loop the runner shares with every stream must never wait on it."""

    def __init__(self, store: JobStore):
        self._store = store

    def __getattr__(self, name: str):
        method = getattr(self._store, name)

        async def call(*args, **kwargs):
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


class JobRunner:
    def __init__(self, store: JobStore, root: Path, adapters: AdapterManager, num_threads: int | None):
        """`root` is the fine-tuning folder (uploaded files, job outputs), shared by replicas like the store."""
        self.store, self.root, self.adapters, self.num_threads = store, root, adapters, num_threads
        self._store = _OffTheLoop(store)  # what the runner's own tasks use
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._training: asyncio.Task | None = None  # the job now training, while the loop validates new ones
        self._training_id: str | None = None
        self._validating: str | None = None
        self._lost: str | None = None  # a job whose claim expired under this replica: another one runs it now
        self._process: multiprocessing.Process | None = None
        self._stopping = False
        # This replica in the jobs' claims and events: which host and process trains a job.
        self._runner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._renewing: asyncio.Task | None = None

    async def start(self) -> None:
        self._renewing = asyncio.create_task(self._keep_claims())
        self._task = asyncio.create_task(self._loop())

    async def shutdown(self) -> None:
        """Stop training; a job cut off here stays `running` and resumes on the next replica to claim it."""
        self._stopping = True
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
        for task in (self._task, self._renewing, self._training):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._training_id is not None:  # another replica (or this one restarted) takes over at once
            await self._store.release(self._training_id, self._runner)

    async def _keep_claims(self) -> None:
        while not self._stopping:
            await asyncio.sleep(CLAIM_TTL_S / 3)
            working = {job_id for job_id in (self._training_id, self._validating) if job_id is not None}
            if not working:  # an idle replica holds no claim: no write every few seconds
                continue
            try:
                held = await self._store.renew_claims(self._runner, working, CLAIM_TTL_S)
            except Exception:  # e.g. the database is down: try again; the claim holds until it expires
                log.exception("could not renew the fine-tuning job claims")
                continue
            if self._training_id not in (None, *held) and self._process is not None:
                # The claim expired (renewals failed past it) and another replica runs this job now.
                log.error("lost the claim on job %s; stopping its training process", self._training_id)
                self._lost = self._training_id
                self._process.terminate()

    async def submit(self, job: JobRecord) -> None:
        await self._store.add_job(job)
        await self._store.add_event(job.id, "info", f"Created fine-tuning job: {job.id}")
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """The worker sees the status at its next step and stops; a queued job never starts."""
        if self.store.set_status(job_id, "cancelled"):
            self.store.add_event(job_id, "info", "Fine-tuning job cancelled")

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._take_work()
            except Exception:  # the database is down, say: the next round tries again
                log.exception("the fine-tuning job loop failed")
            await self._idle()

    async def _take_work(self) -> None:
        while (job := await self._store.claim(self._runner, ("validating_files",),
                                              CLAIM_TTL_S)) is not None:
            self._validating = job.id
            try:
                await self._validate(job)
            finally:
                self._validating = None
            await self._store.release(job.id, self._runner)
        if self._training is None or self._training.done():
            # A claimable `running` job lost its replica: it resumes here.
            job = await self._store.claim(self._runner, ("queued", "running"), CLAIM_TTL_S)
            if job is not None:
                if job.status == "running":
                    await self._store.add_event(job.id, "info", "the job's runner stopped; it resumes from its "
                                                                "last checkpoint")
                self._training_id, self._lost = job.id, None
                self._training = asyncio.create_task(self._train(job))
                self._training.add_done_callback(lambda _: self._wake.set())

    async def _train(self, job: JobRecord) -> None:
        try:
            await self._run(job)
        except Exception as exc:  # one broken job must not stop the queue behind it
            log.exception("fine-tuning job %s failed", job.id)
            await self._store.set_status(job.id, "failed", error={"code": "server_error", "message": str(exc),
                                                                  "param": None})
        finally:
            if not self._stopping:  # (shutdown releases it.) A release lost to an outage expires: not renewed
                self._training_id = None
                await self._store.release(job.id, self._runner)

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
            await self._store.add_event(job.id, "info", f"Validating {label} file: {getattr(job, param)}")
            try:
                read = read_preferences if job.config.get("objective") == "dpo" else read_examples
                examples, warnings = await asyncio.to_thread(read, Path(path))
            except DataError as exc:
                error = {"code": f"invalid_{param}", "message": str(exc), "param": param}
                if await self._store.set_status(job.id, "failed", only_from=frozenset({"validating_files"}),
                                                error=error):
                    await self._store.add_event(job.id, "error", str(exc))
                return
            for warning in warnings:
                await self._store.add_event(job.id, "warn", warning)
            num_examples = num_examples or len(examples)
        hyperparameters = resolve(TrainConfig.model_validate(job.config), num_examples).model_dump(exclude_none=True)
        if await self._store.set_status(job.id, "queued", only_from=frozenset({"validating_files"}),
                                 hyperparameters=hyperparameters):
            await self._store.add_event(job.id, "info", f"Files validated ({num_examples} training examples), "
                                        "moving job to queued state", {"hyperparameters": hyperparameters})

    async def _run(self, job: JobRecord) -> None:
        if not await self._store.set_status(job.id, "running", only_from=frozenset({"queued", "running"})):
            return  # cancelled since it was claimed
        await self._store.add_event(job.id, "info", "Fine-tuning job started", {"replica": self._runner})
        # spawn, not fork: the server's threads (engine, event loop) must not be copied into the child.
        self._process = multiprocessing.get_context("spawn").Process(
            target=run_job, args=(self.store.db.url.render_as_string(hide_password=False), job.id, self.num_threads),
            name=f"swapyard-{job.id}")
        self._process.start()
        await asyncio.to_thread(self._process.join)
        exit_code, self._process = self._process.exitcode, None
        if self._stopping or self._lost == job.id or await self._store.status(job.id) == "cancelled":
            return  # the job goes on elsewhere, or is over: its status is not this replica's to set
        if exit_code != 0:
            last_error = next((e for e in await self._store.events(job.id, None, 50) if e.level == "error"), None)
            message = last_error.message if last_error else f"the training process exited with code {exit_code}"
            code = (last_error.data or {}).get("code", "training_error") if last_error else "training_error"
            await self._store.set_status(job.id, "failed", error={"code": code, "message": message, "param": None})
            return
        await self._register(job)

    async def _register(self, job: JobRecord) -> None:
        out = Path(job.config["out"])
        summary = json.loads((out / SUMMARY_FILE).read_text())
        name = adapter_name(job)
        try:
            await self.adapters.register(name, out, source=f"fine-tune:{job.id}", replace=False, is_pinned=False)
        except AdapterError as exc:
            await self._store.set_status(job.id, "failed", error={"code": "registration_failed",
                                                                  "message": str(exc), "param": None})
            return
        await self._store.add_event(job.id, "info", f"New fine-tuned model created: {name}", summary)
        results = out / RESULTS_FILE
        record = FileRecord(id=new_id("file"), filename="step_metrics.csv", bytes=results.stat().st_size,
                            purpose="fine-tune-results", path=str(results), created_at=int(time.time()))
        await self._store.add_file(record)
        await self._store.set_status(job.id, "succeeded", fine_tuned_model=name,
                                     trained_tokens=summary["trained_tokens"], result_files=[record.id])
        await self._store.add_event(job.id, "info", "Fine-tuning job successfully completed")
