"""Counts kept with the judgements, and indexes for the labelling page's queries.

`next_item` and `progress` counted every item's judgements across the whole queue on each call.
With a count of judgements on each item, partial indexes hold just the items each query wants;
`progress` reads the annotator's count in the queue from `tallies` and the queue's count of items
nobody has judged from `queues`. All are filled in from what is already stored. An annotator's
judgements are indexed with their items, for PostgreSQL's anti-joins.

Revision ID: 0002
Revises: 0001
Create Date: 2025-07-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

INDEXES = {  # frozen here, as schema.py declares them today
    "ix_items_queue_fresh": "gold_choice IS NULL AND judgements = 0",
    "ix_items_queue_started": "gold_choice IS NULL AND judgements > 0 AND judgements < votes",
    "ix_items_queue_gold": "gold_choice IS NOT NULL",
}


def upgrade() -> None:
    op.add_column("items", sa.Column("judgements", sa.Integer(), server_default="0", nullable=False))
    op.execute("UPDATE items SET judgements = (SELECT count(*) FROM judgements AS j WHERE j.item_id = items.id)")
    for name, where in INDEXES.items():
        op.create_index(name, "items", ["queue", "id"], sqlite_where=sa.text(where), postgresql_where=sa.text(where))
    op.drop_index("ix_judgements_annotator_id", "judgements")
    op.create_index("ix_judgements_annotator_id", "judgements", ["annotator_id", "item_id"])
    op.create_table(
        "tallies",
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("judgements", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("annotator_id", "queue", name="pk_tallies"),
        sa.ForeignKeyConstraint(["annotator_id"], ["annotators.id"], name="fk_tallies_annotator_id_annotators", ondelete="CASCADE"),
    )
    op.execute(
        "INSERT INTO tallies (annotator_id, queue, judgements) SELECT j.annotator_id, i.queue, count(*) "
        "FROM judgements AS j JOIN items AS i ON i.id = j.item_id GROUP BY j.annotator_id, i.queue"
    )
    op.create_table(
        "queues",
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("fresh", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("queue", name="pk_queues"),
    )
    op.execute(
        "INSERT INTO queues (queue, fresh) SELECT queue, sum(CASE WHEN gold_choice IS NULL AND judgements = 0 THEN 1 ELSE 0 END) "
        "FROM items GROUP BY queue"
    )


def downgrade() -> None:
    op.drop_table("queues")
    op.drop_table("tallies")
    op.drop_index("ix_judgements_annotator_id", "judgements")
    op.create_index("ix_judgements_annotator_id", "judgements", ["annotator_id"])
    for name in INDEXES:
        op.drop_index(name, "items")
    op.drop_column("items", "judgements")
