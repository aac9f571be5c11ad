"""Alembic's entry point, run only by `LabelStore`, which hands over an open connection.

The store holds its migration lock (a file lock for SQLite, an advisory lock for PostgreSQL) and the
transaction around this, so two processes opening one store never migrate it at once.
"""

from alembic import context

from rlhf.labels.schema import Base

context.configure(connection=context.config.attributes["connection"], target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
