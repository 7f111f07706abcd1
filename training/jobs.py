"""Fine-tuning jobs and their files, events and checkpoints, kept in SQLite so they outlive restarts.

The server process and the training processes share the database (WAL mode): a worker appends
events and checkpoints and reads whether its job was cancelled; the server owns every status change.
"""

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, purpose TEXT NOT NULL,
    path TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, status TEXT NOT NULL, method TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, config TEXT NOT NULL,
    fine_tuned_model TEXT, error TEXT, trained_tokens INTEGER, created_at INTEGER NOT NULL,
    finished_at INTEGER);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    step INTEGER NOT NULL, epoch INTEGER NOT NULL, path TEXT NOT NULL, metrics TEXT NOT NULL);
"""


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
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def _one(self, sql: str, *args) -> tuple | None:
        return self._db.execute(sql, args).fetchone()

    # -- files -----------------------------------------------------------------------------------------

    def add_file(self, record: FileRecord) -> None:
        self._db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)", tuple(record.model_dump().values()))

    def get_file(self, file_id: str) -> FileRecord | None:
        row = self._one("SELECT * FROM files WHERE id = ?", file_id)
        return FileRecord(**dict(zip(FileRecord.model_fields, row))) if row else None

    # -- jobs ------------------------------------------------------------------------------------------

    def add_job(self, record: JobRecord) -> None:
        values = record.model_dump()
        values["config"] = json.dumps(values["config"])
        values["error"] = json.dumps(values["error"]) if values["error"] else None
        self._db.execute(f"INSERT INTO jobs VALUES ({', '.join('?' * len(values))})", tuple(values.values()))

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._one("SELECT * FROM jobs WHERE id = ?", job_id)
        return self._job(row) if row else None

    def list_jobs(self, after: str | None, limit: int) -> list[JobRecord]:
        """Newest first; `after` is the id of the last job of the previous page."""
        if after is not None and (anchor := self.get_job(after)) is not None:
            rows = self._db.execute("SELECT * FROM jobs WHERE (created_at, id) < (?, ?) "
                                    "ORDER BY created_at DESC, id DESC LIMIT ?", (anchor.created_at, after, limit))
        else:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))
        return [self._job(row) for row in rows.fetchall()]

    def jobs_with_status(self, *statuses: str) -> list[JobRecord]:
        marks = ", ".join("?" * len(statuses))
        rows = self._db.execute(f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY created_at, id", statuses)
        return [self._job(row) for row in rows.fetchall()]

    def set_status(self, job_id: str, status: JobStatus, **fields) -> None:
        if "error" in fields:
            fields["error"] = json.dumps(fields["error"])
        if status in FINAL:
            fields["finished_at"] = int(time.time())
        assignments = ", ".join(f"{name} = ?" for name in ["status", *fields])
        self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (status, *fields.values(), job_id))

    def status(self, job_id: str) -> str | None:
        row = self._one("SELECT status FROM jobs WHERE id = ?", job_id)
        return row[0] if row else None

    # -- leases ----------------------------------------------------------------------------------------

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> Literal["acquired", "renewed"] | None:
        """Take or extend lease `name` for `holder` unless another holder's is unexpired (then None).
        "acquired" means the holder did not have it: whatever the previous holder was doing is orphaned."""
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")  # other replicas on this database wait here
        try:
            row = self._one("SELECT holder, expires_at FROM leases WHERE name = ?", name)
            if row is not None and row[0] != holder and row[1] > now:
                held = None
            else:
                self._db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (name, holder, now + ttl_s))
                held = "renewed" if row is not None and row[0] == holder else "acquired"
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return held

    def release_lease(self, name: str, holder: str) -> None:
        self._db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    # -- events and checkpoints ------------------------------------------------------------------------

    def add_event(self, job_id: str, level: str, message: str, data: dict | None = None) -> None:
        self._db.execute("INSERT INTO events (job_id, created_at, level, message, data) VALUES (?, ?, ?, ?, ?)",
                         (job_id, int(time.time()), level, message, json.dumps(data) if data else None))

    def events(self, job_id: str, after: int | None, limit: int) -> list[EventRecord]:
        """Newest first, as OpenAI lists them; `after` is a sequence number from a previous page."""
        rows = self._db.execute("SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                                (job_id, after if after is not None else 2**62, limit)).fetchall()
        return [EventRecord(seq=s, job_id=j, created_at=c, level=lv, message=m, data=json.loads(d) if d else None)
                for s, j, c, lv, m, d in rows]

    def add_checkpoint(self, job_id: str, step: int, epoch: int, path: str, metrics: dict) -> None:
        self._db.execute("INSERT INTO checkpoints (job_id, created_at, step, epoch, path, metrics) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (job_id, int(time.time()), step, epoch, path, json.dumps(metrics)))

    def checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        rows = self._db.execute("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY seq DESC", (job_id,)).fetchall()
        return [CheckpointRecord(seq=s, job_id=j, created_at=c, step=st, epoch=e, path=p, metrics=json.loads(m))
                for s, j, c, st, e, p, m in rows]

    @staticmethod
    def _job(row: tuple) -> JobRecord:
        values = dict(zip(JobRecord.model_fields, row))
        values["config"] = json.loads(values["config"])
        values["error"] = json.loads(values["error"]) if values["error"] else None
        return JobRecord(**values)
