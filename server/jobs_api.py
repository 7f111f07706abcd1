"""OpenAI-style files and fine-tuning jobs: upload training data, start, follow and cancel training."""

import asyncio
import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.archive import confine
from server.dependencies import get_router, get_runner, get_settings
from server.errors import APIError, invalid_request
from server.job_runner import JobRunner
from server.router import Router
from server.settings import ServeSettings
from training.config import TrainConfig
from training.jobs import FINAL, CheckpointRecord, EventRecord, FileRecord, JobRecord, JobStore, new_id

jobs_api = APIRouter()

PageSize = Annotated[int, Query(ge=1, le=1000)]  # bounded: SQLite takes 64-bit limits, and a page must fit memory

# Fields of TrainConfig the server sets itself; the rest are the job's hyperparameters.
_SERVER_FIELDS = {"method", "data", "validation", "out", "model", "cache_dir", "resume"}


class JobMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["lora", "prefix", "prompt", "bottleneck"] = "lora"
    hyperparameters: dict[str, Any] = {}  # any TrainConfig field; OpenAI's n_epochs means epochs


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str  # a file id from POST /v1/files, or a server path inside --adapter-roots
    validation_file: str | None = None
    suffix: str | None = Field(None, max_length=40)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    method: JobMethod = JobMethod()


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str

    @classmethod
    def of(cls, r: FileRecord) -> "FileObject":
        return cls(id=r.id, bytes=r.bytes, created_at=r.created_at, filename=r.filename, purpose=r.purpose)


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    status: str
    method: dict
    training_file: str
    validation_file: str | None
    fine_tuned_model: str | None
    error: JobError | None
    trained_tokens: int | None
    created_at: int
    finished_at: int | None
    seed: int
    hyperparameters: dict

    @classmethod
    def of(cls, r: JobRecord) -> "JobObject":
        hyper = {k: v for k, v in r.config.items() if k not in _SERVER_FIELDS}
        return cls(id=r.id, model=r.model, status=r.status, method={"type": r.method, "hyperparameters": hyper},
                   training_file=r.training_file, validation_file=r.validation_file,
                   fine_tuned_model=r.fine_tuned_model,
                   error=JobError(**r.error) if r.error else None, trained_tokens=r.trained_tokens,
                   created_at=r.created_at, finished_at=r.finished_at, seed=r.config["seed"], hyperparameters=hyper)


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict | None
    type: Literal["message"] = "message"

    @classmethod
    def of(cls, r: EventRecord) -> "EventObject":
        return cls(id=f"ftevent-{r.seq}", created_at=r.created_at, level=r.level, message=r.message, data=r.data)


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str  # the checkpoint's folder: registrable with POST /v1/adapters
    fine_tuning_job_id: str
    step_number: int
    metrics: dict

    @classmethod
    def of(cls, r: CheckpointRecord) -> "CheckpointObject":
        return cls(id=f"ftckpt-{r.seq}", created_at=r.created_at, fine_tuned_model_checkpoint=r.path,
                   fine_tuning_job_id=r.job_id, step_number=r.step, metrics={**r.metrics, "epoch": r.epoch})


class Page(BaseModel):
    object: Literal["list"] = "list"
    data: list
    has_more: bool


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
        return Path(record.path)
    return confine(reference, settings.adapter_roots, field=param, is_dir=False)


@jobs_api.post("/v1/files", response_model=FileObject)
async def upload_file(request: Request, runner: JobRunner = Depends(get_runner)) -> FileObject:
    form = await request.form(max_files=1, max_fields=4)  # spooled to disk; BodyLimit bounds its size
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "multipart upload needs the data in a `file` field", param="file")
    if purpose != "fine-tune":
        raise APIError(400, "purpose must be `fine-tune`", param="purpose")
    file_id = new_id("file")
    path = runner.store.path.parent / "files" / f"{file_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> int:  # disk work off the event loop
        with path.open("wb") as out:
            shutil.copyfileobj(upload.file, out)
        return path.stat().st_size

    num_bytes = await asyncio.to_thread(save)
    record = FileRecord(id=file_id, filename=upload.filename or "upload.jsonl", bytes=num_bytes, purpose=purpose,
                        path=str(path), created_at=int(time.time()))
    runner.store.add_file(record)
    return FileObject.of(record)


@jobs_api.get("/v1/files/{file_id}", response_model=FileObject)
async def show_file(file_id: str, runner: JobRunner = Depends(get_runner)) -> FileObject:
    record = runner.store.get_file(file_id)
    if record is None:
        raise APIError(404, f"no file `{file_id}`", param="file_id", code="file_not_found")
    return FileObject.of(record)


@jobs_api.post("/v1/fine_tuning/jobs", response_model=JobObject)
async def create_job(body: CreateJob, runner: JobRunner = Depends(get_runner),
                     settings: ServeSettings = Depends(get_settings),
                     router: Router = Depends(get_router)) -> JobObject:
    if body.model != router.base_model:
        raise APIError(400, f"fine-tuning trains adapters for the served base model `{router.base_model}` only",
                       param="model", code="model_not_available")
    hyper = dict(body.method.hyperparameters)
    if "n_epochs" in hyper:
        hyper["epochs"] = hyper.pop("n_epochs")
    if forbidden := _SERVER_FIELDS & hyper.keys():
        raise APIError(400, f"hyperparameters may not set {sorted(forbidden)}", param="method.hyperparameters")
    if body.seed is not None:
        if hyper.get("seed", body.seed) != body.seed:
            raise APIError(400, "`seed` and `method.hyperparameters.seed` differ; give one", param="seed")
        hyper["seed"] = body.seed
    job_id = new_id("ftjob")
    data = _training_path(body.training_file, "training_file", runner.store, settings)
    validation = _training_path(body.validation_file, "validation_file", runner.store, settings) \
        if body.validation_file else None
    try:
        config = TrainConfig(method=body.method.type, data=data, validation=validation, model=settings.model,
                             out=runner.store.path.parent / "jobs" / job_id, cache_dir=settings.cache_dir, **hyper)
    except ValidationError as exc:
        error = invalid_request(exc.errors())
        raise APIError(400, error.body.error.message, param=f"method.hyperparameters.{error.body.error.param}") from exc
    job = JobRecord(id=job_id, model=body.model, status="validating_files", method=body.method.type,
                    training_file=body.training_file, validation_file=body.validation_file, suffix=body.suffix,
                    config=config.model_dump(mode="json"), fine_tuned_model=None, error=None, trained_tokens=None,
                    created_at=int(time.time()), finished_at=None)
    runner.submit(job)
    return JobObject.of(job)


@jobs_api.get("/v1/fine_tuning/jobs", response_model=Page)
async def list_jobs(after: str | None = None, limit: PageSize = 20, runner: JobRunner = Depends(get_runner)) -> Page:
    jobs = runner.store.list_jobs(after, limit + 1)
    return Page(data=[JobObject.of(j) for j in jobs[:limit]], has_more=len(jobs) > limit)


@jobs_api.get("/v1/fine_tuning/jobs/{job_id}", response_model=JobObject)
async def show_job(job_id: str, runner: JobRunner = Depends(get_runner)) -> JobObject:
    return JobObject.of(_job_or_404(runner.store, job_id))


@jobs_api.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=Page)
async def job_events(job_id: str, after: str | None = None, limit: PageSize = 20,
                     runner: JobRunner = Depends(get_runner)) -> Page:
    _job_or_404(runner.store, job_id)
    anchor = int(after.removeprefix("ftevent-")) if after and after.removeprefix("ftevent-").isdigit() else None
    events = runner.store.events(job_id, anchor, limit + 1)
    return Page(data=[EventObject.of(e) for e in events[:limit]], has_more=len(events) > limit)


@jobs_api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=Page)
async def job_checkpoints(job_id: str, runner: JobRunner = Depends(get_runner)) -> Page:
    _job_or_404(runner.store, job_id)
    return Page(data=[CheckpointObject.of(c) for c in runner.store.checkpoints(job_id)], has_more=False)


@jobs_api.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=JobObject)
async def cancel_job(job_id: str, runner: JobRunner = Depends(get_runner)) -> JobObject:
    job = _job_or_404(runner.store, job_id)
    if job.status in FINAL:
        raise APIError(400, f"job `{job_id}` has already {job.status}", param="fine_tuning_job_id")
    runner.cancel(job_id)
    return JobObject.of(runner.store.get_job(job_id))
