"""Fine-tuning jobs and their files, events and checkpoints, kept in the database (SQLite or PostgreSQL)
so that they outlive restarts and are shared by replicas.

The server processes and the training processes share the database: a worker appends events and
checkpoints and reads whether its job was cancelled; the servers own every status change. A replica
works on a job only while it holds the job's claim (`claim`), renewed every few seconds, so that each
job is validated and trained by one replica at a time, and a dead replica's job passes to another.
"""

import json
import time
import uuid
from typing import Literal, get_args

from pydantic import BaseModel
from sqlalchemy import Connection, delete, false, insert, or_, select, tuple_, update

from server.database import Database
from server.database.schema import checkpoints, events, files, jobs

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset(get_args(JobStatus)) - FINAL
_JSON_FIELDS = ("config", "error", "hyperparameters", "result_files", "metadata")


class FileRecord(BaseModel):
    id: str
    filename: str
    bytes: int
    purpose: str
    path: str
    created_at: int


class JobRecord(BaseModel):
    id: str
    model: str
    status: JobStatus
    method: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    config: dict  # TrainConfig as JSON, paths resolved to the stored files
    fine_tuned_model: str | None
    error: dict | None
    trained_tokens: int | None
    created_at: int
    finished_at: int | None
    hyperparameters: dict | None = None  # the resolved values, once the training file is validated
    result_files: list[str] = []
    metadata: dict[str, str] | None = None


class EventRecord(BaseModel):
    seq: int
    job_id: str
    created_at: int
    level: str
    message: str
    data: dict | None


class CheckpointRecord(BaseModel):
    seq: int
    job_id: str
    created_at: int
    step: int
    epoch: int
    path: str
    metrics: dict


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class JobStore:
    def __init__(self, database: Database):
        self.db = database

    # -- files -----------------------------------------------------------------------------------------

    def add_file(self, record: FileRecord) -> None:
        with self.db.write() as connection:
            connection.execute(insert(files).values(record.model_dump() | {"created_ns": time.time_ns()}))

    def get_file(self, file_id: str) -> FileRecord | None:
        with self.db.read() as connection:
            row = connection.execute(select(*_FILE_COLUMNS).where(files.c.id == file_id)).mappings().first()
        return FileRecord(**row) if row else None

    def list_files(self, purpose: str | None, after: str | None, limit: int, newest_first: bool) -> list[FileRecord]:
        """In upload order, or its reverse; `after` is the id of the last file of the previous page."""
        query = select(*_FILE_COLUMNS)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        with self.db.read() as connection:
            page = _page(connection, query, files, after, newest_first)
            return [FileRecord(**row) for row in connection.execute(page.limit(limit)).mappings()]

    def delete_file(self, file_id: str) -> None:
        with self.db.write() as connection:
            connection.execute(delete(files).where(files.c.id == file_id))

    def jobs_using_file(self, file_id: str, statuses: frozenset[str]) -> list[str]:
        query = select(jobs.c.id).where(or_(jobs.c.training_file == file_id, jobs.c.validation_file == file_id),
                                        jobs.c.status.in_(statuses))
        with self.db.read() as connection:
            return list(connection.execute(query).scalars())

    # -- jobs ------------------------------------------------------------------------------------------

    def add_job(self, record: JobRecord) -> None:
        values = {name: _to_column(name, value) for name, value in record.model_dump().items()}
        with self.db.write() as connection:
            connection.execute(insert(jobs).values(values | {"created_ns": time.time_ns()}))

    def get_job(self, job_id: str) -> JobRecord | None:
        with self.db.read() as connection:
            row = connection.execute(select(*_JOB_COLUMNS).where(jobs.c.id == job_id)).mappings().first()
        return _job(row) if row else None

    def list_jobs(self, after: str | None, limit: int) -> list[JobRecord]:
        """Newest first; `after` is the id of the last job of the previous page."""
        with self.db.read() as connection:
            page = _page(connection, select(*_JOB_COLUMNS), jobs, after, newest_first=True)
            return [_job(row) for row in connection.execute(page.limit(limit)).mappings()]

    def set_status(self, job_id: str, status: JobStatus, *, only_from: frozenset[str] = ACTIVE, **fields) -> bool:
        """Move the job to `status` if it is now in one of `only_from` (by default: not finished, so a cancel
        through another replica is never overwritten). Returns whether it moved."""
        fields = {name: _to_column(name, value) for name, value in fields.items()}
        if status in FINAL:
            fields["finished_at"] = int(time.time())
        with self.db.write() as connection:
            moved = connection.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(only_from))
                                       .values(status=status, **fields))
        return moved.rowcount == 1

    def status(self, job_id: str) -> str | None:
        with self.db.read() as connection:
            return connection.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar()

    # -- claims ----------------------------------------------------------------------------------------

    def claim(self, runner: str, statuses: tuple[str, ...], ttl_s: float) -> JobRecord | None:
        """Take the oldest job in one of `statuses` that no live replica holds (never claimed, released,
        or its claim expired: that replica died), for `ttl_s`. None when there is none."""
        now = time.time()
        free = or_(jobs.c.runner.is_(None), jobs.c.claim_expires_at < now)
        with self.db.write() as connection:  # PostgreSQL: replicas skip a row another is claiming
            row = connection.execute(select(*_JOB_COLUMNS).where(jobs.c.status.in_(statuses), free)
                                     .order_by(jobs.c.created_ns, jobs.c.id).limit(1)
                                     .with_for_update(skip_locked=True)).mappings().first()
            if row is None:
                return None
            connection.execute(update(jobs).where(jobs.c.id == row["id"])
                               .values(runner=runner, claim_expires_at=now + ttl_s))
        return _job(row)

    def renew_claims(self, runner: str, job_ids: set[str], ttl_s: float) -> set[str]:
        """Extend `runner`'s claims on `job_ids` (the jobs it works on: a claim it failed to release expires);
        returns those it still holds."""
        mine = (jobs.c.runner == runner, jobs.c.id.in_(job_ids))
        with self.db.write() as connection:
            connection.execute(update(jobs).where(*mine).values(claim_expires_at=time.time() + ttl_s))
            return set(connection.execute(select(jobs.c.id).where(*mine)).scalars())

    def release(self, job_id: str, runner: str) -> None:
        """Give the job's claim up (another replica may take the job at once, if it is not finished)."""
        with self.db.write() as connection:
            connection.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.runner == runner)
                               .values(runner=None, claim_expires_at=None))

    # -- events and checkpoints ------------------------------------------------------------------------

    def add_event(self, job_id: str, level: str, message: str, data: dict | None = None) -> None:
        with self.db.write() as connection:
            connection.execute(insert(events).values(job_id=job_id, created_at=int(time.time()), level=level,
                                                     message=message, data=json.dumps(data) if data else None))

    def events(self, job_id: str, after: int | None, limit: int) -> list[EventRecord]:
        """Newest first, as OpenAI lists them; `after` is a sequence number from a previous page."""
        rows = self._newest(events, job_id, after, limit)
        return [EventRecord(**row | {"data": json.loads(row["data"]) if row["data"] else None}) for row in rows]

    def add_checkpoint(self, job_id: str, step: int, epoch: int, path: str, metrics: dict) -> None:
        with self.db.write() as connection:
            connection.execute(insert(checkpoints).values(job_id=job_id, created_at=int(time.time()), step=step,
                                                          epoch=epoch, path=path, metrics=json.dumps(metrics)))

    def checkpoints(self, job_id: str, after: int | None, limit: int) -> list[CheckpointRecord]:
        """Newest first; `after` is a sequence number from a previous page."""
        rows = self._newest(checkpoints, job_id, after, limit)
        return [CheckpointRecord(**row | {"metrics": json.loads(row["metrics"])}) for row in rows]

    def _newest(self, table, job_id: str, after: int | None, limit: int) -> list[dict]:
        query = select(table).where(table.c.job_id == job_id)
        if after is not None:
            query = query.where(table.c.seq < after)
        with self.db.read() as connection:
            return [dict(row) for row in connection.execute(query.order_by(table.c.seq.desc()).limit(limit))
                    .mappings()]


_FILE_COLUMNS = [files.c[name] for name in FileRecord.model_fields]
_JOB_COLUMNS = [jobs.c[name] for name in JobRecord.model_fields]


def _page(connection: Connection, query, table, after: str | None, newest_first: bool):
    """`query` ordered by (created_ns, id), from just past row `after` (keyset pagination; an unknown
    `after` gives an empty page)."""
    key = tuple_(table.c.created_ns, table.c.id)
    if after is not None:
        anchor = connection.execute(select(table.c.created_ns, table.c.id).where(table.c.id == after)).first()
        if anchor is None:
            return query.where(false())
        query = query.where(key < tuple_(*anchor) if newest_first else key > tuple_(*anchor))
    order = (table.c.created_ns.desc(), table.c.id.desc()) if newest_first else (table.c.created_ns, table.c.id)
    return query.order_by(*order)


def _job(row) -> JobRecord:
    values = dict(row)
    for name in _JSON_FIELDS:
        values[name] = json.loads(values[name]) if values[name] else None
    values["result_files"] = values["result_files"] or []
    return JobRecord(**values)


def _to_column(name: str, value):
    return json.dumps(value) if name in _JSON_FIELDS and value is not None else value
