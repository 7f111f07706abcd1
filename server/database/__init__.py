"""The database behind the adapter registry and the fine-tuning jobs: SQLite (a local file, the default)
or PostgreSQL (replicas on several nodes). One schema serves both; Alembic migrates it at start-up.

Reads run in autocommit (no transaction to open and close); writes run in a transaction that takes
SQLite's write lock at once (BEGIN IMMEDIATE), so that two writers queue instead of failing when one
upgrades a read. A database that stops answering is reported (`is_up`, /ready) and not asked again for
RETRY_AFTER_S, so requests that need nothing new from it go on meanwhile. Writers announce changes
(`notify`) to whoever waits for them (`wait_for_change`): PostgreSQL's NOTIFY reaches every replica at once.
"""

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import InterfaceError, OperationalError

RETRY_AFTER_S = 1.0
# How long the event loop's callers wait for the database before going on without it (serving what they read
# before, or answering /ready with 503): far above a healthy database's answer, far below a dropped
# connection's (minutes), and within Kubernetes' default probe timeout (1 s).
WAIT_S = 0.5
# Dropped packets: the kernel gives up on a connection whose data goes unacknowledged this long (libpq's
# tcp_user_timeout, in ms), so a query fails instead of waiting forever for an answer.
TCP_USER_TIMEOUT_MS = 10_000
SQLITE_BUSY_TIMEOUT_S = 30
CONNECT_TIMEOUT_S = 3
STATEMENT_TIMEOUT_MS = 10_000
_MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x5357_4150  # PostgreSQL advisory lock taken while a replica migrates ("SWAP")


class DatabaseUnavailable(Exception):
    """The database did not answer (down, unreachable, or locked past the timeout)."""


def normalize_url(url: str) -> URL:
    """`postgresql://` and `postgres://` mean psycopg 3 (SQLAlchemy would pick psycopg2, not installed)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"database URL scheme `{parsed.drivername}`: use sqlite:///PATH or postgresql://...")
    return parsed


def url_from_env() -> str | None:
    """$SWAPYARD_DATABASE_URL, the default of --database-url (empty: none, as compose passes it unset)."""
    return os.environ.get("SWAPYARD_DATABASE_URL") or None


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


class Database:
    def __init__(self, url: str, *, migrate: bool = True):
        self.url = normalize_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if self.url.database in (None, "", ":memory:"):
                raise ValueError("an SQLite database URL needs a file: sqlite:///PATH")
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            options = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}}
        else:  # no pre-ping (a round trip per checkout): a dropped connection fails one query, then the pool renews
            options = {"pool_size": 5, "max_overflow": 10, "pool_timeout": CONNECT_TIMEOUT_S, "pool_recycle": 1800,
                       "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S, "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
                                        "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"}}
        self.engine = create_engine(self.url, **options)
        # Reads get a pool of their own, in autocommit from the start: switching a pooled connection to
        # autocommit and back doubled the cost of the registry's per-request version read.
        self._reader = create_engine(self.url, isolation_level="AUTOCOMMIT", **options)
        if self.is_sqlite:
            for engine in (self.engine, self._reader):
                event.listen(engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._failed_at: float | None = None
        self._listener: psycopg.Connection | None = None  # LISTENing, on the watcher's thread
        self._ping: asyncio.Future[bool] | None = None
        if migrate:
            self.migrate()

    def migrate(self) -> None:
        """Bring the schema to the newest revision; replicas starting together take turns."""
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with self.write() as connection:  # SQLite: BEGIN IMMEDIATE serializes migrators
            if not self.is_sqlite:
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def is_up(self) -> bool:
        """False for RETRY_AFTER_S after a failure: callers serve what they have instead of waiting."""
        return self._failed_at is None or time.monotonic() - self._failed_at > RETRY_AFTER_S

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._reporting(), self._reader.connect() as connection:
            yield connection

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._reporting(), self.engine.begin() as connection:
            yield connection

    def notify(self, connection: Connection, channel: str) -> None:
        """Wake whoever waits on `channel`, on every replica, once this write transaction commits. SQLite
        has no notifications: its readers poll."""
        if not self.is_sqlite:
            connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})

    def wait_for_change(self, channel: str, timeout: float) -> None:
        """Return once a writer notified `channel`, or `timeout` passed; at once after (re)connecting, as a
        change may have come unannounced meanwhile. Readers check the database after each return (a dropped
        connection cannot tell it missed a notification). PostgreSQL: LISTEN on a connection of its own, from
        one thread; SQLite: this only sleeps. Raises DatabaseUnavailable when the connection fails."""
        if self.is_sqlite:
            time.sleep(timeout)
            return
        try:
            if self._listener is None:
                _, params = self._reader.dialect.create_connect_args(self.url)
                self._listener = psycopg.connect(**params, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                                 tcp_user_timeout=TCP_USER_TIMEOUT_MS)
                self._listener.execute(f"LISTEN {channel}")
                return
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as exc:
            self.stop_listening()
            raise DatabaseUnavailable(f"listening to the database failed: {exc}") from exc

    def stop_listening(self) -> None:
        """Close wait_for_change's connection (from its thread: psycopg's waits are not cut from another)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def ping(self) -> bool:
        try:
            with self.read() as connection:
                connection.execute(text("SELECT 1"))
        except DatabaseUnavailable:
            return False
        return True

    async def answers(self) -> bool:
        """Whether a ping answers within WAIT_S. One ping at a time, in a worker thread, shared by every caller
        meanwhile: a database that hangs holds one thread, not one per readiness probe."""
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(asyncio.to_thread(self.ping))
        try:
            return await asyncio.wait_for(asyncio.shield(self._ping), WAIT_S)
        except TimeoutError:
            return False

    @contextmanager
    def _reporting(self) -> Iterator[None]:
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            self._failed_at = time.monotonic()
            raise DatabaseUnavailable(f"the database ({self.url.render_as_string(hide_password=True)}) did not "
                                      f"answer: {exc.orig or exc}") from exc
        self._failed_at = None

    def close(self) -> None:
        self.engine.dispose()
        self._reader.dispose()


def _sqlite_connect(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # transactions begin where SQLAlchemy says (below), not lazily
    # WAL stays set in the file. Switching to it needs the file alone, and SQLite answers "locked" at once,
    # without the busy timeout, to connections that open a new file together: retry those.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")
