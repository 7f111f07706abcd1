"""Adapter lifecycle: immutable versions with a content hash, aliases (with traffic splits), and an audit log.

Each adapter registered before this revision becomes a version of its own, with no hash (it is addressed by
number only).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("adapters", sa.Column("sha256", sa.Text))
    op.create_table(
        "adapter_versions",
        sa.Column("name", sa.Text, primary_key=True), sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False), sa.Column("num_virtual_tokens", sa.Integer, nullable=False),
        sa.Column("sha256", sa.Text), sa.Column("folder", sa.Text, nullable=False),
        sa.Column("num_bytes", sa.BigInteger, nullable=False), sa.Column("source", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False), sa.Column("created_by", sa.Text),
        sa.Column("provenance", sa.Text))
    op.create_index("adapter_versions_by_folder", "adapter_versions", ["folder"])
    op.execute("INSERT INTO adapter_versions (name, version, kind, num_virtual_tokens, folder, num_bytes, source, "
               "created_at) SELECT name, version, kind, num_virtual_tokens, folder, num_bytes, source, created_at "
               "FROM adapters")
    op.create_table(
        "aliases",
        sa.Column("name", sa.Text, primary_key=True), sa.Column("targets", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False), sa.Column("updated_by", sa.Text))
    op.create_index("aliases_name_ignoring_case", "aliases", [sa.text("lower(name)")], unique=True)
    op.create_table(
        "adapter_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.Text, nullable=False), sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("actor", sa.Text), sa.Column("action", sa.Text, nullable=False), sa.Column("version", sa.Integer),
        sa.Column("data", sa.Text),
        sqlite_autoincrement=True)
    op.create_index("adapter_events_by_name", "adapter_events", ["name", "seq"])
