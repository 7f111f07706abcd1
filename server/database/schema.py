"""The tables, once, for SQLite and PostgreSQL alike; migrations/ brings a database up to them.

JSON values are kept as text and timestamps as numbers, so both databases store the same thing.
Lists are ordered by `created_ns` then `id` (keyset pagination), not by SQLite's rowid, which
PostgreSQL lacks.
"""

from sqlalchemy import BigInteger, Boolean, Column, Float, Index, Integer, MetaData, Table, Text, func

metadata = MetaData()

adapters = Table(
    "adapters", metadata,
    Column("name", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("num_virtual_tokens", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("folder", Text, nullable=False),
    Column("num_bytes", BigInteger, nullable=False),
    Column("is_pinned", Boolean, nullable=False),
    Column("source", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("sha256", Text),  # of its files (null for a version registered before versions were kept)
)
# Names are unique ignoring case, enforced by the database so that two replicas cannot both take one.
Index("adapters_name_ignoring_case", func.lower(adapters.c.name), unique=True)

# Every version of every registered adapter: immutable, addressed as `name@version` or `name@sha256:...`, kept
# up to --keep-versions. Identical content shares one folder in the store (`folder` names it).
adapter_versions = Table(
    "adapter_versions", metadata,
    Column("name", Text, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("num_virtual_tokens", Integer, nullable=False),
    Column("sha256", Text),
    Column("folder", Text, nullable=False),
    Column("num_bytes", BigInteger, nullable=False),
    Column("source", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", Text),  # the admin key's tenant; null on a server without keys
    Column("provenance", Text),  # JSON: how it was built, for a composed adapter
)
Index("adapter_versions_by_folder", adapter_versions.c.folder)

# Names clients may send as `model` that point at versions: one, or several with weights (a traffic split).
aliases = Table(
    "aliases", metadata,
    Column("name", Text, primary_key=True),
    Column("targets", Text, nullable=False),  # JSON: [{"adapter", "version", "weight"}]
    Column("updated_at", Float, nullable=False),
    Column("updated_by", Text),
)
Index("aliases_name_ignoring_case", func.lower(aliases.c.name), unique=True)

# The audit log: every registration, replacement, deletion, pruned version and alias move, by adapter name;
# kept after the adapter is deleted (its version numbers are never reused).
adapter_events = Table(
    "adapter_events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("actor", Text),
    Column("action", Text, nullable=False),
    Column("version", Integer),
    Column("data", Text),
    sqlite_autoincrement=True,
)
Index("adapter_events_by_name", adapter_events.c.name, adapter_events.c.seq)

# One row: bumped by every registry write. Replicas' watchers compare it to their cached copy, and writers
# lock it to allot versions one at a time.
registry_state = Table(
    "registry_state", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
)

files = Table(
    "files", metadata,
    Column("id", Text, primary_key=True),
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("path", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("created_ns", BigInteger, nullable=False),
)

jobs = Table(
    "jobs", metadata,
    Column("id", Text, primary_key=True),
    Column("model", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("method", Text, nullable=False),
    Column("training_file", Text, nullable=False),
    Column("validation_file", Text),
    Column("suffix", Text),
    Column("config", Text, nullable=False),
    Column("fine_tuned_model", Text),
    Column("error", Text),
    Column("trained_tokens", BigInteger),
    Column("created_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger),
    Column("hyperparameters", Text),
    Column("result_files", Text),
    Column("metadata", Text),
    Column("created_ns", BigInteger, nullable=False),
    # The replica working on the job (validating or training) and until when its claim holds; a claim
    # that expires (the replica died) lets another replica take the job over.
    Column("runner", Text),
    Column("claim_expires_at", Float),
)
Index("jobs_by_status", jobs.c.status)

events = Table(
    "events", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("level", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("data", Text),
    sqlite_autoincrement=True,
)
Index("events_by_job", events.c.job_id, events.c.seq)

checkpoints = Table(
    "checkpoints", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("step", Integer, nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("metrics", Text, nullable=False),
    sqlite_autoincrement=True,
)
Index("checkpoints_by_job", checkpoints.c.job_id, checkpoints.c.seq)
