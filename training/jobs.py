"""Fine-tuning jobs and their files, events and checkpoints, kept in SQLite so they outlive restarts.

The server process and the training processes share the database (WAL mode): a worker appends
events and checkpoints and reads whether its job was cancelled; the server owns every status change.
"""

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE: frozenset[str] = frozenset(get_args(JobStatus)) - FINAL

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, bytes INTEGER NOT NULL, purpose TEXT NOT NULL,
    path TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, status TEXT NOT NULL, method TEXT NOT NULL,
    training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, config TEXT NOT NULL,
    fine_tuned_model TEXT, error TEXT, trained_tokens INTEGER, created_at INTEGER NOT NULL,
    finished_at INTEGER, hyperparameters TEXT, result_files TEXT, metadata TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    level TEXT NOT NULL, message TEXT NOT NULL, data TEXT);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, created_at INTEGER NOT NULL,
    step INTEGER NOT NULL, epoch INTEGER NOT NULL, path TEXT NOT NULL, metrics TEXT NOT NULL);
"""
# Columns added since the first schema, for databases created before them.
_ADDED_COLUMNS = {"jobs": ("hyperparameters", "result_files", "metadata")}
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
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column in columns:
                if column not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")

    def _one(self, sql: str, *args) -> tuple | None:
        return self._db.execute(sql, args).fetchone()

    # -- files -----------------------------------------------------------------------------------------

    def add_file(self, record: FileRecord) -> None:
        self._db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)", tuple(record.model_dump().values()))

    def get_file(self, file_id: str) -> FileRecord | None:
        row = self._one(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ?", file_id)
        return FileRecord(**dict(zip(FileRecord.model_fields, row))) if row else None

    def list_files(self, purpose: str | None, after: str | None, limit: int, newest_first: bool) -> list[FileRecord]:
        """In upload order (rowid), or its reverse; `after` is the id of the last file of the previous page."""
        order, beyond = ("DESC", "<") if newest_first else ("ASC", ">")
        where, args = [], []
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            where.append(f"rowid {beyond} (SELECT rowid FROM files WHERE id = ?)")
            args.append(after)
        rows = self._db.execute(f"SELECT {_FILE_COLUMNS} FROM files {'WHERE ' + ' AND '.join(where) if where else ''} "
                                f"ORDER BY rowid {order} LIMIT ?", (*args, limit))
        return [FileRecord(**dict(zip(FileRecord.model_fields, row))) for row in rows.fetchall()]

    def delete_file(self, file_id: str) -> None:
        self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def jobs_using_file(self, file_id: str, statuses: frozenset[str]) -> list[str]:
        marks = ", ".join("?" * len(statuses))
        rows = self._db.execute(f"SELECT id FROM jobs WHERE (training_file = ? OR validation_file = ?) "
                                f"AND status IN ({marks})", (file_id, file_id, *statuses))
        return [row[0] for row in rows.fetchall()]

    # -- jobs ------------------------------------------------------------------------------------------

    def add_job(self, record: JobRecord) -> None:
        values = {name: _to_column(name, value) for name, value in record.model_dump().items()}
        self._db.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({', '.join('?' * len(values))})",
                         tuple(values.values()))

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._one(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", job_id)
        return self._job(row) if row else None

    def list_jobs(self, after: str | None, limit: int) -> list[JobRecord]:
        """Newest first; `after` is the id of the last job of the previous page."""
        anchor = "WHERE rowid < (SELECT rowid FROM jobs WHERE id = ?)" if after is not None else ""
        rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs {anchor} ORDER BY rowid DESC LIMIT ?",
                                (after, limit) if after is not None else (limit,))
        return [self._job(row) for row in rows.fetchall()]

    def jobs_with_status(self, *statuses: str) -> list[JobRecord]:
        marks = ", ".join("?" * len(statuses))
        rows = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ({marks}) ORDER BY rowid", statuses)
        return [self._job(row) for row in rows.fetchall()]

    def set_status(self, job_id: str, status: JobStatus, **fields) -> None:
        fields = {name: _to_column(name, value) for name, value in fields.items()}
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
        rows = self._page("events", job_id, after, limit)
        return [EventRecord(seq=s, job_id=j, created_at=c, level=lv, message=m, data=json.loads(d) if d else None)
                for s, j, c, lv, m, d in rows]

    def add_checkpoint(self, job_id: str, step: int, epoch: int, path: str, metrics: dict) -> None:
        self._db.execute("INSERT INTO checkpoints (job_id, created_at, step, epoch, path, metrics) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (job_id, int(time.time()), step, epoch, path, json.dumps(metrics)))

    def checkpoints(self, job_id: str, after: int | None, limit: int) -> list[CheckpointRecord]:
        """Newest first; `after` is a sequence number from a previous page."""
        rows = self._page("checkpoints", job_id, after, limit)
        return [CheckpointRecord(seq=s, job_id=j, created_at=c, step=st, epoch=e, path=p, metrics=json.loads(m))
                for s, j, c, st, e, p, m in rows]

    def _page(self, table: Literal["events", "checkpoints"], job_id: str, after: int | None, limit: int) -> list:
        return self._db.execute(f"SELECT * FROM {table} WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                                (job_id, after if after is not None else 2**62, limit)).fetchall()

    @staticmethod
    def _job(row: tuple) -> JobRecord:
        values = dict(zip(JobRecord.model_fields, row))
        for name in _JSON_FIELDS:
            values[name] = json.loads(values[name]) if values[name] else None
        values["result_files"] = values["result_files"] or []
        return JobRecord(**values)


_FILE_COLUMNS = ", ".join(FileRecord.model_fields)
_JOB_COLUMNS = ", ".join(JobRecord.model_fields)


def _to_column(name: str, value):
    return json.dumps(value) if name in _JSON_FIELDS and value is not None else value
