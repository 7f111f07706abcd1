"""Replicas on one database: a registry version row, names unique ignoring case in the database,
keyset ordering without rowid, and per-job claims in place of the single runner lease.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    state = op.create_table("registry_state", sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
                            sa.Column("version", sa.BigInteger, nullable=False))
    op.bulk_insert(state, [{"id": 1, "version": 0}])
    op.create_index("adapters_name_ignoring_case", "adapters", [sa.text("lower(name)")], unique=True)
    # Upload order: SQLite's rowid breaks ties within a second for rows written before this revision.
    tie = " + rowid" if op.get_bind().dialect.name == "sqlite" else ""
    for table in ("files", "jobs"):
        op.add_column(table, sa.Column("created_ns", sa.BigInteger))
        op.execute(f"UPDATE {table} SET created_ns = created_at * 1000000000{tie}")
        with op.batch_alter_table(table) as batch:
            batch.alter_column("created_ns", existing_type=sa.BigInteger, nullable=False)
    op.add_column("jobs", sa.Column("runner", sa.Text))
    op.add_column("jobs", sa.Column("claim_expires_at", sa.Float))
    op.create_index("jobs_by_status", "jobs", ["status"])
    op.create_index("events_by_job", "events", ["job_id", "seq"])
    op.create_index("checkpoints_by_job", "checkpoints", ["job_id", "seq"])
    op.drop_table("leases")
