"""Alembic's entry point: runs the migrations on the connection server.database hands it."""

from alembic import context

from server.database.schema import metadata

connection = context.config.attributes["connection"]
# SQLite alters a table by copying it (batch mode); PostgreSQL alters it in place.
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
