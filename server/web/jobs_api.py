"""OpenAI's fine-tuning jobs API: start, follow and cancel training (files are in files_api)."""

import asyncio
import shutil
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from adapters.archive import confine
from server.dependencies import get_router, get_runner, get_settings
from server.errors import APIError
from server.web.files_api import UPLOAD_PURPOSE
from server.web.fine_tuning_protocol import CheckpointObject, CreateJob, EventObject, JobObject, Page, train_config
from server.job_runner import JobRunner
from server.router import Router
from server.settings import ServeSettings
from training.jobs import FINAL, JobRecord, JobStore, new_id

# Routes that only read or write the job store are plain functions: FastAPI runs them in its thread pool, so
# a slow or unreachable database never holds the event loop (and with it every stream).
jobs_api = APIRouter()

START_FOLDER = "start"  # inside a job's folder: the adapter a job continues, as it was when the job was created
PageSize = Annotated[int, Query(ge=1, le=1000)]  # bounded: SQLite takes 64-bit limits, and a page must fit memory


def _job_or_404(store: JobStore, job_id: str) -> JobRecord:
    job = store.get_job(job_id)
    if job is None:
        raise APIError(404, f"no fine-tuning job `{job_id}`", param="fine_tuning_job_id", code="job_not_found")
    return job


def _training_path(reference: str, param: str, store: JobStore, settings: ServeSettings) -> Path:
    if reference.startswith("file-"):
        record = store.get_file(reference)
        if record is None:
            raise APIError(400, f"no file `{reference}`; upload it with POST /v1/files", param=param)
        if record.purpose != UPLOAD_PURPOSE:
            raise APIError(400, f"file `{reference}` has purpose `{record.purpose}`, not `{UPLOAD_PURPOSE}`",
                           param=param)
        return Path(record.path)
    return confine(reference, settings.adapter_roots, field=param, is_dir=False)


def _sequence(anchor: str | None, prefix: str) -> int | None:
    """The sequence number in an event or checkpoint id (`after` of a page); None for anything else."""
    number = anchor.removeprefix(prefix) if anchor else ""
    return int(number) if number.isdigit() else None


@jobs_api.post("/v1/fine_tuning/jobs", response_model=JobObject)
async def create_job(body: CreateJob, runner: JobRunner = Depends(get_runner),
                     settings: ServeSettings = Depends(get_settings),
                     router: Router = Depends(get_router)) -> JobObject:
    start = None if body.model == router.base_model else await router.adapters.get(body.model)
    if body.model != router.base_model and start is None:
        raise APIError(400, f"fine-tuning trains adapters for the served base model `{router.base_model}`, or "
                            f"continues one of its adapters; `{body.model}` is neither", param="model",
                       code="model_not_available")
    job_id = new_id("ftjob")
    data = await asyncio.to_thread(_training_path, body.training_file, "training_file", runner.store, settings)
    validation = await asyncio.to_thread(_training_path, body.validation_file, "validation_file", runner.store,
                                         settings) if body.validation_file else None
    out = settings.jobs_dir / job_id
    config = train_config(body, start.kind if start else None, data=data, validation=validation,
                          model=settings.model, out=out, cache_dir=settings.cache_dir,
                          init_adapter=out / START_FOLDER if start else None)
    if start is not None:  # the job's own copy: the registry may replace or delete the adapter meanwhile
        try:
            await asyncio.to_thread(shutil.copytree, router.adapters.registry.path(start), out / START_FOLDER)
        except OSError as exc:  # replaced or deleted since it was looked up
            await asyncio.to_thread(shutil.rmtree, out, ignore_errors=True)
            raise APIError(409, f"adapter `{body.model}` changed while the job was created; try again",
                           param="model") from exc
    job = JobRecord(id=job_id, model=body.model, status="validating_files", method=config.method,
                    training_file=body.training_file, validation_file=body.validation_file, suffix=body.suffix,
                    config=config.model_dump(mode="json"), fine_tuned_model=None, error=None, trained_tokens=None,
                    created_at=int(time.time()), finished_at=None, metadata=body.metadata)
    try:
        await runner.submit(job)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, out, ignore_errors=True)  # the start copy, if any
        raise
    return JobObject.of(job)


@jobs_api.get("/v1/fine_tuning/jobs", response_model=Page)
def list_jobs(after: str | None = None, limit: PageSize = 20, runner: JobRunner = Depends(get_runner)) -> Page:
    return Page.of([JobObject.of(j) for j in runner.store.list_jobs(after, limit + 1)], limit)


@jobs_api.get("/v1/fine_tuning/jobs/{job_id}", response_model=JobObject)
def show_job(job_id: str, runner: JobRunner = Depends(get_runner)) -> JobObject:
    return JobObject.of(_job_or_404(runner.store, job_id))


@jobs_api.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=Page)
def job_events(job_id: str, after: str | None = None, limit: PageSize = 20,
                     runner: JobRunner = Depends(get_runner)) -> Page:
    _job_or_404(runner.store, job_id)
    events = runner.store.events(job_id, _sequence(after, "ftevent-"), limit + 1)
    return Page.of([EventObject.of(e) for e in events], limit)


@jobs_api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=Page)
def job_checkpoints(job_id: str, after: str | None = None, limit: PageSize = 10,
                          runner: JobRunner = Depends(get_runner)) -> Page:
    _job_or_404(runner.store, job_id)
    checkpoints = runner.store.checkpoints(job_id, _sequence(after, "ftckpt-"), limit + 1)
    return Page.of([CheckpointObject.of(c) for c in checkpoints], limit)


@jobs_api.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, runner: JobRunner = Depends(get_runner)) -> JobObject:
    job = _job_or_404(runner.store, job_id)
    if job.status in FINAL:
        raise APIError(400, f"job `{job_id}` has already {job.status}", param="fine_tuning_job_id")
    runner.cancel(job_id)
    return JobObject.of(runner.store.get_job(job_id))
