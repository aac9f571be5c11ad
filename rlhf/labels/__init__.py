"""The label store of the human loop: pairs of responses that people judge, kept in SQLite or PostgreSQL.

Engine layer: no Prefect here. The schema is created and changed only by the Alembic migrations in
`migrations/`, which `LabelStore` applies when it opens a store.
"""
