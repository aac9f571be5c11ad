"""The tables of the label store, as the ORM sees them.

The database gets them from the migrations only (`migrations/versions/`); a test compares these
declarations with a migrated database, so a change here without a migration fails.
Constraint names follow one naming convention so that later migrations can refer to them by name.
JSON values are stored as text: the same bytes on SQLite and PostgreSQL, hashed for deduplication.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    CheckConstraint, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint, and_, literal_column,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

CHOICES = ("A", "B", "tie", "both_bad")
CHOICE_SQL = "({})".format(", ".join(f"'{choice}'" for choice in CHOICES))

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class AnnotatorRow(Base):
    __tablename__ = "annotators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the token; the token itself is never kept
    owner: Mapped[bool]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ItemRow(Base):
    __tablename__ = "items"
    __table_args__ = (
        Index("ix_items_queue_purpose", "queue", "purpose"),
        Index("ix_items_queue_content_key", "queue", "content_key"),
        CheckConstraint(f"gold_choice IS NULL OR gold_choice IN {CHOICE_SQL}", name="gold_choice"),
        CheckConstraint("votes >= 1", name="votes"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    queue: Mapped[str] = mapped_column(String(200))
    batch: Mapped[str] = mapped_column(String(200))
    content_key: Mapped[str] = mapped_column(String(64))  # sha256 of (prompt, response_a, response_b): imports deduplicate on it
    prompt: Mapped[str] = mapped_column(Text)
    response_a: Mapped[str] = mapped_column(Text)
    response_b: Mapped[str] = mapped_column(Text)
    policy_a: Mapped[str] = mapped_column(Text)
    policy_b: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(20))
    gold_choice: Mapped[str | None] = mapped_column(String(10))
    votes: Mapped[int]
    # this item's rows in `judgements`, kept in the same transaction as every insert and delete of one, so
    # the page's queries read an item's state from its row instead of counting judgements across the queue
    judgements: Mapped[int] = mapped_column(default=0, server_default="0")
    score_gap: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# Where an item stands, as the labelling page asks: an ordinary item nobody has judged yet (FRESH), one that
# has judgements and wants more (STARTED), a gold check (GOLD). Each is the WHERE of a partial index on
# (queue, id), and the store's queries repeat it, so that a query reads just those items, in id order.
# The constants are literal in the SQL, not parameters: a planner can then tell the index applies.
_ZERO = literal_column("0")
FRESH = and_(ItemRow.gold_choice.is_(None), ItemRow.judgements == _ZERO)
STARTED = and_(ItemRow.gold_choice.is_(None), ItemRow.judgements > _ZERO, ItemRow.judgements < ItemRow.votes)
GOLD = ItemRow.gold_choice.is_not(None)
Index("ix_items_queue_fresh", ItemRow.queue, ItemRow.id, sqlite_where=FRESH, postgresql_where=FRESH)
Index("ix_items_queue_started", ItemRow.queue, ItemRow.id, sqlite_where=STARTED, postgresql_where=STARTED)
Index("ix_items_queue_gold", ItemRow.queue, ItemRow.id, sqlite_where=GOLD, postgresql_where=GOLD)


class JudgementRow(Base):
    __tablename__ = "judgements"
    __table_args__ = (
        UniqueConstraint("item_id", "annotator_id"),  # one judgement per person and item, whatever the callers do
        # what one annotator has judged, in item order: PostgreSQL anti-joins a queue's items with it
        Index("ix_judgements_annotator_id", "annotator_id", "item_id"),
        CheckConstraint(f"choice IN {CHOICE_SQL}", name="choice"),
        CheckConstraint("ms IS NULL OR ms >= 0", name="ms"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    choice: Mapped[str] = mapped_column(String(10))
    comment: Mapped[str | None] = mapped_column(Text)
    ms: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TallyRow(Base):
    """An annotator's count of judgements in a queue, kept like an item's count: `progress` reads it
    instead of counting the annotator's judgements on every call."""

    __tablename__ = "tallies"

    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), primary_key=True)
    queue: Mapped[str] = mapped_column(String(200), primary_key=True)
    judgements: Mapped[int]


class QueueRow(Base):
    """A queue's count of FRESH items, kept like an item's count: `progress` reads it instead of counting
    the queue's unjudged items on every call."""

    __tablename__ = "queues"

    queue: Mapped[str] = mapped_column(String(200), primary_key=True)
    fresh: Mapped[int]


class BatchRow(Base):
    """A batch of items added to a queue: a rerun of the stage that proposed it adds nothing twice."""

    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("queue", "batch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    queue: Mapped[str] = mapped_column(String(200))
    batch: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class MarkRow(Base):
    __tablename__ = "marks"
    __table_args__ = (UniqueConstraint("queue", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    queue: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    judgement_id: Mapped[int]  # a watermark, not a reference: the judgement may be withdrawn later
