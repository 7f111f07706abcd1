"""The registry and job store on both databases (SQLite and a real PostgreSQL), their migrations, and
the claims that let replicas share fine-tuning jobs."""

import json
import sqlite3
import threading
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from adapters.registry import AdapterExists, AdapterRegistry
from server.database import Database, DatabaseUnavailable, sqlite_url
from server.database.schema import metadata
from server.web.fine_tuning_protocol import JobObject
from training.jobs import FileRecord, JobRecord, JobStore


def test_migrations_build_exactly_the_schema(database_url):
    """Replicas starting together on an empty database take turns: one migrates, the others find it done."""
    errors = []

    def start() -> None:
        try:
            Database(database_url)
        except Exception as exc:  # noqa: BLE001 - collected, the assert below names it
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    database = Database(database_url)
    with database.read() as connection:
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0004"


def _register(registry: AdapterRegistry, name: str, tmp_path, *, replace=False, content="x"):
    files = tmp_path / f"files-{name}-{content}"
    files.mkdir(exist_ok=True)
    (files / "adapter_config.json").write_text(content)
    (files / "adapter_model.safetensors").write_text(content)  # the registry stores an adapter's two files
    return registry.add(name, "lora", 0, files, source="test", replace=replace, is_pinned=False)


def test_registry_versions_replace_and_delete_across_replicas(database_url, tmp_path):
    here = AdapterRegistry(tmp_path / "root", Database(database_url))
    there = AdapterRegistry(tmp_path / "root", Database(database_url))  # another replica, same store
    assert _register(here, "shared", tmp_path).version == 1
    assert there.get("shared").version == 1  # seen at once: the registry's version moved
    record = _register(there, "shared", tmp_path, replace=True, content="y")
    assert record.version == 2 and here.get("shared") == record
    assert (here.path(record) / "adapter_config.json").read_text() == "y"
    with pytest.raises(AdapterExists):
        _register(there, "SHARED", tmp_path)  # names are unique ignoring case, in the database
    with pytest.raises(AdapterExists):
        _register(there, "shared", tmp_path)  # taken, and not a replace
    assert here.remove("shared")[0] == record and there.get("shared") is None
    assert not here.path(record).exists() and list((tmp_path / "root" / "store" / "sha256").iterdir()) == []


def test_concurrent_registrations_on_two_replicas_allot_distinct_versions(database_url, tmp_path):
    replicas = [AdapterRegistry(tmp_path / "root", Database(database_url)) for _ in range(2)]
    versions, errors = [], []

    def register(registry: AdapterRegistry, index: int) -> None:
        for round_ in range(5):
            try:
                versions.append(_register(registry, "busy", tmp_path, replace=True, content=f"{index}{round_}").version)
            except Exception as exc:  # noqa: BLE001 - collected, the assert below names it
                errors.append(exc)

    threads = [threading.Thread(target=register, args=(r, i)) for i, r in enumerate(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and sorted(versions) == list(range(1, 11))
    kept = replicas[0].snapshot().versions["busy"]
    assert sorted(kept) == list(range(6, 11))  # the newest --keep-versions (5); older ones' files removed
    assert {f"sha256/{f.name}" for f in (tmp_path / "root" / "store" / "sha256").iterdir()} == \
        {version.folder for version in kept.values()}


def _until(seen, within_s: float) -> float:
    """Seconds until `seen()` is true, failing past `within_s`."""
    start = time.monotonic()
    while not seen():
        assert time.monotonic() - start < within_s, f"not seen within {within_s} s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_a_watched_registry_follows_other_replicas_within_a_second(database_url, tmp_path):
    """The copy a server serves from (`cached`, read without the database) follows another replica's
    registrations, replaces and deletions by itself: PostgreSQL's NOTIFY wakes the watcher, SQLite's version
    row is polled."""
    here = AdapterRegistry(tmp_path / "root", Database(database_url))
    there = AdapterRegistry(tmp_path / "root", Database(database_url))
    here.watch()
    try:
        time.sleep(0.3)  # the watcher is listening
        _register(there, "shared", tmp_path)
        _until(lambda: "shared" in here.cached(), 1.0)
        replaced = _register(there, "shared", tmp_path, replace=True, content="y")
        _until(lambda: here.cached()["shared"] == replaced, 1.0)
        there.remove("shared")
        _until(lambda: "shared" not in here.cached(), 1.0)
    finally:
        here.close()


def _job(job_id: str, status: str = "queued") -> JobRecord:
    return JobRecord(id=job_id, model="m", status=status, method="lora", training_file="file-x", validation_file=None,
                     suffix=None, config={"data": "/d"}, fine_tuned_model=None, error=None, trained_tokens=None,
                     created_at=int(time.time()), finished_at=None)


def test_job_store_pages_and_claims(database_url):
    store = JobStore(Database(database_url))
    for index in range(5):
        store.add_file(FileRecord(id=f"file-{index}", filename="a.jsonl", bytes=1, purpose="fine-tune",
                                  path="/a", created_at=int(time.time())))
    assert [f.id for f in store.list_files(None, None, 2, newest_first=False)] == ["file-0", "file-1"]
    assert [f.id for f in store.list_files(None, "file-1", 2, newest_first=False)] == ["file-2", "file-3"]
    assert [f.id for f in store.list_files("fine-tune", "file-3", 9, newest_first=True)] == ["file-2", "file-1",
                                                                                              "file-0"]
    assert store.list_files(None, "file-nope", 9, newest_first=False) == []

    for job_id in ("ftjob-a", "ftjob-b"):
        store.add_job(_job(job_id))
    first = store.claim("replica-1", ("queued",), ttl_s=30)
    second = store.claim("replica-2", ("queued",), ttl_s=30)
    assert (first.id, second.id) == ("ftjob-a", "ftjob-b")  # oldest first, each to one replica
    assert store.claim("replica-3", ("queued",), ttl_s=30) is None
    assert store.renew_claims("replica-1", {"ftjob-a", "ftjob-b"}, ttl_s=30) == {"ftjob-a"}
    store.release("ftjob-a", "replica-2")  # not its claim: nothing changes
    assert store.claim("replica-3", ("queued",), ttl_s=30) is None
    store.set_status("ftjob-b", "running")
    store.renew_claims("replica-2", {"ftjob-b"}, ttl_s=-1)  # replica-2 died: its claim expires
    assert store.claim("replica-3", ("running",), ttl_s=30).id == "ftjob-b"
    assert store.renew_claims("replica-2", {"ftjob-b"}, ttl_s=30) == set()  # and it knows it lost the job
    assert [j.id for j in store.list_jobs(None, 9)] == ["ftjob-b", "ftjob-a"]
    assert [j.id for j in store.list_jobs("ftjob-b", 9)] == ["ftjob-a"]

    for step in (1, 2, 3):
        store.add_event("ftjob-a", "info", f"step {step}", {"step": step})
    events = store.events("ftjob-a", None, 2)
    assert [e.data["step"] for e in events] == [3, 2]
    assert [e.data["step"] for e in store.events("ftjob-a", events[-1].seq, 9)] == [1]


def test_many_replicas_claim_each_job_once(database_url):
    stores = [JobStore(Database(database_url)) for _ in range(4)]
    for index in range(12):
        stores[0].add_job(_job(f"ftjob-{index:02}"))
    claimed: list[str] = []

    def work(store: JobStore, runner: str) -> None:
        while (job := store.claim(runner, ("queued",), ttl_s=30)) is not None:
            claimed.append(job.id)
            store.set_status(job.id, "succeeded")

    threads = [threading.Thread(target=work, args=(s, f"replica-{i}")) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == [f"ftjob-{index:02}" for index in range(12)]


def test_databases_from_before_migrations_are_adopted(tmp_path):
    """A registry file and a job store written by the versions before migrations (SQLite, no version
    table) gain the new tables and columns, and keep their rows and order."""
    registry_file, jobs_file = tmp_path / "adapters" / "registry.sqlite3", tmp_path / "jobs.sqlite3"
    registry_file.parent.mkdir()
    with sqlite3.connect(registry_file) as old:
        old.execute("CREATE TABLE adapters (name TEXT PRIMARY KEY, kind TEXT NOT NULL, num_virtual_tokens INTEGER "
                    "NOT NULL, version INTEGER NOT NULL, folder TEXT NOT NULL, num_bytes INTEGER NOT NULL, "
                    "is_pinned INTEGER NOT NULL, source TEXT NOT NULL, created_at REAL NOT NULL)")
        old.execute("INSERT INTO adapters VALUES ('old', 'lora', 0, 3, 'old/abc', 10, 1, 'here', 1.0)")
    with sqlite3.connect(jobs_file) as old:
        old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, model TEXT NOT NULL, status TEXT NOT NULL, "
                    "method TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT, "
                    "config TEXT NOT NULL, fine_tuned_model TEXT, error TEXT, trained_tokens INTEGER, "
                    "created_at INTEGER NOT NULL, finished_at INTEGER)")
        config = {"method": "lora", "data": "/d.jsonl", "out": "/o", "epochs": 3, "batch_size": 4,
                  "learning_rate": 2e-4, "seed": 0}
        for job_id in ("ftjob-old", "ftjob-older"):  # same second: upload order must survive
            old.execute("INSERT INTO jobs VALUES (?, 'm', 'succeeded', 'lora', 'file-x', NULL, NULL, ?, "
                        "'ft-old', NULL, 10, 1, 2)", (job_id, json.dumps(config)))
    registry = AdapterRegistry(registry_file.parent)
    assert registry.get("old").version == 3 and registry.get("old").is_pinned
    store = JobStore(Database(sqlite_url(jobs_file)))
    assert [j.id for j in store.list_jobs(None, 9)] == ["ftjob-older", "ftjob-old"]
    job = JobObject.of(store.get_job("ftjob-old"))
    assert job.hyperparameters["n_epochs"] == 3 and job.hyperparameters["learning_rate"] == 2e-4
    assert job.result_files == [] and job.method["supervised"]["adapter"]["type"] == "lora"


def test_registry_serves_its_last_copy_while_postgres_is_down(postgres, tmp_path):
    url = postgres.new_database()
    registry = AdapterRegistry(tmp_path / "root", Database(url))
    _register(registry, "kept", tmp_path)
    postgres.stop()
    try:
        assert registry.get("kept").version == 1  # from the cache, without waiting on the database
        assert not registry.db.ping()
        with pytest.raises(DatabaseUnavailable):
            _register(registry, "new", tmp_path, content="new")
    finally:
        postgres.start()
    time.sleep(1.1)  # past the retry pause
    # Its staged files (unknown then whether a version shared them) go with the next start-up's sweep.
    restarted = AdapterRegistry(tmp_path / "root", Database(url), sweep_after_s=0)
    assert {f"sha256/{f.name}" for f in (tmp_path / "root" / "store" / "sha256").iterdir()} == \
        {restarted.get("kept").folder}
    assert registry.db.ping() and _register(registry, "new", tmp_path).version == 1


def test_identical_content_is_stored_once_and_outlives_one_of_its_names(database_url, tmp_path):
    registry = AdapterRegistry(tmp_path / "root", Database(database_url), keep_versions=1)
    first, same = _register(registry, "one", tmp_path), _register(registry, "two", tmp_path)
    assert first.folder == same.folder == f"sha256/{first.sha256}"
    assert registry.remove("one")[0] == first and registry.path(same).is_dir()  # `two` still holds the files
    # keep_versions=1: a replace prunes the version before, and its files once nothing else holds them.
    replaced = _register(registry, "two", tmp_path, replace=True, content="y")
    assert sorted(registry.snapshot().versions["two"]) == [replaced.version] and not registry.path(same).exists()
    assert [e.action for e in registry.events("two")] == ["registered", "replaced", "pruned"]
