"""The tables of the first release (before migrations), created where missing.

A database from before migrations has some of them (a registry file has `adapters`, a job store the
rest) and no version yet; this revision adopts it as it is.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("name", sa.Text, primary_key=True), sa.Column("kind", sa.Text, nullable=False),
        sa.Column("num_virtual_tokens", sa.Integer, nullable=False), sa.Column("version", sa.Integer, nullable=False),
        sa.Column("folder", sa.Text, nullable=False), sa.Column("num_bytes", sa.BigInteger, nullable=False),
        sa.Column("is_pinned", sa.Boolean, nullable=False), sa.Column("source", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        if_not_exists=True)
    op.create_table(
        "files",
        sa.Column("id", sa.Text, primary_key=True), sa.Column("filename", sa.Text, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False), sa.Column("purpose", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False), sa.Column("created_at", sa.BigInteger, nullable=False),
        if_not_exists=True)
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text, primary_key=True), sa.Column("model", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False), sa.Column("method", sa.Text, nullable=False),
        sa.Column("training_file", sa.Text, nullable=False), sa.Column("validation_file", sa.Text),
        sa.Column("suffix", sa.Text), sa.Column("config", sa.Text, nullable=False),
        sa.Column("fine_tuned_model", sa.Text), sa.Column("error", sa.Text), sa.Column("trained_tokens", sa.BigInteger),
        sa.Column("created_at", sa.BigInteger, nullable=False), sa.Column("finished_at", sa.BigInteger),
        if_not_exists=True)
    for table in ("events", "checkpoints"):
        fields = ([sa.Column("level", sa.Text, nullable=False), sa.Column("message", sa.Text, nullable=False),
                   sa.Column("data", sa.Text)] if table == "events" else
                  [sa.Column("step", sa.Integer, nullable=False), sa.Column("epoch", sa.Integer, nullable=False),
                   sa.Column("path", sa.Text, nullable=False), sa.Column("metrics", sa.Text, nullable=False)])
        op.create_table(table, sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                        sa.Column("job_id", sa.Text, nullable=False),
                        sa.Column("created_at", sa.BigInteger, nullable=False), *fields,
                        sqlite_autoincrement=True, if_not_exists=True)
    op.create_table(
        "leases",
        sa.Column("name", sa.Text, primary_key=True), sa.Column("holder", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        if_not_exists=True)
