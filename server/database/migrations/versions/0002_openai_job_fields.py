"""Jobs keep their resolved hyperparameters, result files and metadata (the OpenAI job shape).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A job store written just before migrations already has them (SQLite cannot ADD COLUMN IF NOT EXISTS).
    present = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("jobs")}
    for name in ("hyperparameters", "result_files", "metadata"):
        if name not in present:
            op.add_column("jobs", sa.Column(name, sa.Text))
