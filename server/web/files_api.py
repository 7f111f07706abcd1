"""OpenAI's files API: upload training data; list, read and delete files (a job's results CSV among them)."""

import asyncio
import shutil
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from server.dependencies import get_runner
from server.errors import APIError
from server.web.fine_tuning_protocol import FileDeleted, FileObject, Page
from server.job_runner import JobRunner
from training.jobs import ACTIVE, FileRecord, JobStore, new_id

# As in jobs_api: routes that only use the job store are plain functions, run in FastAPI's thread pool.
files_api = APIRouter()

UPLOAD_PURPOSE = "fine-tune"


def file_or_404(store: JobStore, file_id: str) -> FileRecord:
    record = store.get_file(file_id)
    if record is None:
        raise APIError(404, f"no file `{file_id}`", param="file_id", code="file_not_found")
    return record


@files_api.post("/v1/files", response_model=FileObject)
async def upload_file(request: Request, runner: JobRunner = Depends(get_runner)) -> FileObject:
    """Upload training data: multipart with the JSONL in `file` and `purpose` `fine-tune`."""
    form = await request.form(max_files=1, max_fields=4)  # spooled to disk; BodyLimit bounds its size
    upload, purpose = form.get("file"), form.get("purpose")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "multipart upload needs the data in a `file` field", param="file")
    if purpose != UPLOAD_PURPOSE:
        raise APIError(400, f"purpose must be `{UPLOAD_PURPOSE}`", param="purpose")
    file_id = new_id("file")
    path = runner.root / "files" / f"{file_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> int:  # disk work off the event loop
        with path.open("wb") as out:
            shutil.copyfileobj(upload.file, out)
        return path.stat().st_size

    num_bytes = await asyncio.to_thread(save)
    record = FileRecord(id=file_id, filename=(upload.filename or "upload.jsonl")[:255], bytes=num_bytes,
                        purpose=purpose, path=str(path), created_at=int(time.time()))
    await asyncio.to_thread(runner.store.add_file, record)
    return FileObject.of(record)


@files_api.get("/v1/files", response_model=Page)
def list_files(purpose: Annotated[str | None, Query(max_length=64)] = None, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                     order: Literal["asc", "desc"] = "desc", runner: JobRunner = Depends(get_runner)) -> Page:
    files = runner.store.list_files(purpose, after, limit + 1, newest_first=order == "desc")
    return Page.of([FileObject.of(f) for f in files], limit)


@files_api.get("/v1/files/{file_id}", response_model=FileObject)
def show_file(file_id: str, runner: JobRunner = Depends(get_runner)) -> FileObject:
    return FileObject.of(file_or_404(runner.store, file_id))


@files_api.get("/v1/files/{file_id}/content")
def file_content(file_id: str, runner: JobRunner = Depends(get_runner)) -> FileResponse:
    record = file_or_404(runner.store, file_id)
    if not Path(record.path).is_file():
        raise APIError(404, f"the content of file `{file_id}` is gone", param="file_id", code="file_not_found")
    return FileResponse(record.path, filename=record.filename, media_type="application/octet-stream")


@files_api.delete("/v1/files/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, runner: JobRunner = Depends(get_runner)) -> FileDeleted:
    record = file_or_404(runner.store, file_id)
    if users := runner.store.jobs_using_file(file_id, ACTIVE):
        raise APIError(409, f"file `{file_id}` is in use by fine-tuning job `{users[0]}`; cancel it or wait until "
                            "it ends", param="file_id", code="file_in_use")
    runner.store.delete_file(file_id)
    Path(record.path).unlink(missing_ok=True)
    return FileDeleted(id=file_id)
