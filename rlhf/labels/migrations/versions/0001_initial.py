"""The first label store: annotators, items, judgements, batches, marks.

Revision ID: 0001
Revises:
Create Date: 2025-06-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

CHOICES = "('A', 'B', 'tie', 'both_bad')"  # frozen here: a later change of the choices is a new migration


def upgrade() -> None:
    op.create_table(
        "annotators",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("owner", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_annotators"),
        sa.UniqueConstraint("name", name="uq_annotators_name"),
        sa.UniqueConstraint("token_hash", name="uq_annotators_token_hash"),
    )
    op.create_table(
        "items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("batch", sa.String(200), nullable=False),
        sa.Column("content_key", sa.String(64), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("response_a", sa.Text(), nullable=False),
        sa.Column("response_b", sa.Text(), nullable=False),
        sa.Column("policy_a", sa.Text(), nullable=False),
        sa.Column("policy_b", sa.Text(), nullable=False),
        sa.Column("purpose", sa.String(20), nullable=False),
        sa.Column("gold_choice", sa.String(10), nullable=True),
        sa.Column("votes", sa.Integer(), nullable=False),
        sa.Column("score_gap", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_items"),
        sa.CheckConstraint(f"gold_choice IS NULL OR gold_choice IN {CHOICES}", name="ck_items_gold_choice"),
        sa.CheckConstraint("votes >= 1", name="ck_items_votes"),
    )
    op.create_index("ix_items_queue_purpose", "items", ["queue", "purpose"])
    op.create_index("ix_items_queue_content_key", "items", ["queue", "content_key"])
    op.create_table(
        "judgements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("annotator_id", sa.Integer(), nullable=False),
        sa.Column("choice", sa.String(10), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("ms", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_judgements"),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], name="fk_judgements_item_id_items", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["annotator_id"], ["annotators.id"], name="fk_judgements_annotator_id_annotators", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("item_id", "annotator_id", name="uq_judgements_item_id_annotator_id"),
        sa.CheckConstraint(f"choice IN {CHOICES}", name="ck_judgements_choice"),
        sa.CheckConstraint("ms IS NULL OR ms >= 0", name="ck_judgements_ms"),
    )
    op.create_index("ix_judgements_annotator_id", "judgements", ["annotator_id"])
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("batch", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_batches"),
        sa.UniqueConstraint("queue", "batch", name="uq_batches_queue_batch"),
    )
    op.create_table(
        "marks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("judgement_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_marks"),
        sa.UniqueConstraint("queue", "name", name="uq_marks_queue_name"),
    )


def downgrade() -> None:
    for table in ("marks", "batches", "judgements", "items", "annotators"):
        op.drop_table(table)
