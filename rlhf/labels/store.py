"""The label store: items to judge, annotators, and their judgements, in SQLite or PostgreSQL.

A web server calls one `LabelStore` from a thread pool and pipeline stages open their own, possibly
in other processes at the same time: every call is one short transaction of its own, every rule
that must never break (one judgement per annotator and item, one batch per queue) is a constraint
in the database rather than a check in Python, and opening a store migrates it under a lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from alembic import command
from alembic.config import Config
from filelock import FileLock
from sqlalchemy import bindparam, create_engine, delete, event, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from rlhf.labels.agreement import agreement
from rlhf.labels.schema import (
    CHOICES, FRESH, GOLD, STARTED, AnnotatorRow, BatchRow, ItemRow, JudgementRow, MarkRow, QueueRow, TallyRow,
)


MAX_COMMENT = 2000
MAX_MS = 86_400_000  # a day: longer is a tab left open, not time spent judging
PURPOSES = ("train", "gate")
MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK_KEY = 0x726C6866  # PostgreSQL advisory lock taken while migrating ("rlhf")
WINDOW = 8  # next_item picks at random among this many lowest ids, so concurrent annotators rarely get the same item
BUSY_TIMEOUT_MS = 30_000


def store_url(home: Path, configured: str | None = None) -> str:
    """RLHF_LABELS_URL when set, else `configured` (the pipeline's labels.url), else sqlite:///<home>/labels.db."""
    return os.environ.get("RLHF_LABELS_URL") or configured or f"sqlite:///{Path(home).resolve() / 'labels.db'}"


@dataclass(frozen=True)
class NewItem:
    prompt: list[dict]
    response_a: str
    response_b: str
    policy_a: dict
    policy_b: dict
    purpose: str = "train"
    gold_choice: str | None = None
    votes: int = 1
    score_gap: float | None = None


@dataclass(frozen=True)
class Item:
    """What an annotator is shown: never the gold answer."""

    id: int
    queue: str
    prompt: list[dict]
    response_a: str
    response_b: str
    purpose: str


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    owner: bool


@dataclass(frozen=True)
class Record:
    """One judgement as a file carries it: the item by its content, the annotator by name."""

    queue: str
    prompt: list[dict]
    response_a: str
    response_b: str
    choice: str
    annotator: str
    comment: str | None = None
    ms: int | None = None
    created_at: datetime | None = None
    purpose: str = "train"
    policy_a: dict = field(default_factory=dict)
    policy_b: dict = field(default_factory=dict)
    gold_choice: str | None = None


class LabelError(Exception):
    """A refused request; `status` is the HTTP status a server answers with."""

    status: int = 400


class Unauthorized(LabelError):
    status = 401


class UnknownItem(LabelError):
    status = 404


class AlreadyJudged(LabelError):
    status = 409


class NothingToUndo(LabelError):
    status = 404


class BadJudgement(LabelError):
    status = 422


def check_judgement(choice: str, comment: str | None, ms: int | None) -> None:
    """The rules for a judgement's own fields, shared by `judge` and the importers."""
    if choice not in CHOICES:
        raise BadJudgement(f"choice {choice!r} is not one of {', '.join(CHOICES)}")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
        raise BadJudgement(f"a comment is text of at most {MAX_COMMENT} characters")
    if ms is not None and (type(ms) is not int or not 0 <= ms <= MAX_MS):
        raise BadJudgement(f"ms is whole milliseconds from 0 to {MAX_MS}, not {ms!r}")


def check_item(item: NewItem) -> None:
    """The rules for an item's fields; breaking one is the calling code's mistake, not an annotator's: ValueError."""
    messages = item.prompt
    if not (isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )):
        raise ValueError(f"a prompt is a non-empty list of chat messages {{'role': ..., 'content': ...}}, not {messages!r:.200}")
    if not (isinstance(item.response_a, str) and isinstance(item.response_b, str)):
        raise ValueError("response_a and response_b are text")
    if not (isinstance(item.policy_a, dict) and isinstance(item.policy_b, dict)):
        raise ValueError("policy_a and policy_b are JSON objects")
    if item.purpose not in PURPOSES:
        raise ValueError(f"purpose {item.purpose!r} is not one of {', '.join(PURPOSES)}")
    if item.gold_choice is not None and item.gold_choice not in CHOICES:
        raise ValueError(f"gold_choice {item.gold_choice!r} is not one of {', '.join(CHOICES)}")
    if type(item.votes) is not int or item.votes < 1:
        raise ValueError(f"votes is a whole number of at least 1, not {item.votes!r}")


class LabelStore:
    """Thread-safe: sessions are per call, the engine's pool hands each thread its own connection."""

    def __init__(self, url: str):
        self.url = make_url(url)
        self.sqlite = self.url.get_backend_name() == "sqlite"
        if self.sqlite:
            if not self.url.database or self.url.database == ":memory:":
                raise ValueError(f"{url}: the label store needs a file (each connection to :memory: is another database)")
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url)
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = create_engine(self.url, pool_pre_ping=True)
        self._writes = sessionmaker(self.engine, expire_on_commit=False)
        self._reads = sessionmaker(self.engine.execution_options(label_store_reads=True), expire_on_commit=False)
        upsert = (sqlite if self.sqlite else postgresql).insert
        self._add_to_tally, self._add_to_queue = _adding(upsert, TallyRow, "judgements"), _adding(upsert, QueueRow, "fresh")
        self._migrate()

    def _migrate(self) -> None:
        """Alembic upgrade to head, one process at a time (the second finds the work done)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
        lock = FileLock(f"{self.url.database}.migrate-lock") if self.sqlite else nullcontext()
        with lock, self.engine.begin() as connection:
            if not self.sqlite:
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ annotators

    def add_annotator(self, name: str, owner: bool = False) -> str:
        """A new token for `name`, created when new; an existing annotator's old token stops working.

        The owner flag is set to `owner` either way. Only the token's sha256 is kept: whoever reads
        the database cannot log in with it.
        """
        if not name or len(name) > 200 or name != name.strip():
            raise LabelError(f"an annotator's name is 1 to 200 characters without surrounding spaces, not {name!r}")
        token = secrets.token_urlsafe(32)
        with self._writes.begin() as session:
            row = session.scalar(select(AnnotatorRow).where(AnnotatorRow.name == name))
            if row is None:
                session.add(AnnotatorRow(name=name, token_hash=_sha256(token), owner=owner, created_at=_now()))
            else:
                row.token_hash, row.owner = _sha256(token), owner
        return token

    def authenticate(self, token: str) -> Annotator | None:
        with self._reads.begin() as session:
            row = session.scalar(select(AnnotatorRow).where(AnnotatorRow.token_hash == _sha256(token)))
            return None if row is None else Annotator(row.id, row.name, row.owner)

    # ------------------------------------------------------------ items

    def add_items(self, queue: str, batch: str, items: list[NewItem]) -> int:
        """Adds the batch in one transaction, or nothing when `batch` is already in `queue`.

        A rerun of the stage that proposed the batch so adds nothing twice. Returns the number of
        items the batch holds either way.
        """
        for item in items:
            check_item(item)
        now = _now()
        try:
            with self._writes.begin() as session:
                if session.scalar(select(BatchRow.id).where(BatchRow.queue == queue, BatchRow.batch == batch)) is None:
                    session.add(BatchRow(queue=queue, batch=batch, created_at=now))
                    session.flush()  # a second process adding the same batch now fails here, on the unique constraint
                    if items:
                        session.execute(insert(ItemRow), [_item_values(queue, batch, item, now) for item in items])
                        self._count(session, {}, {}, {queue: sum(item.gold_choice is None for item in items)})
        except IntegrityError:
            pass  # another process added this batch at the same moment: it holds the items
        with self._reads.begin() as session:
            return session.scalar(
                select(func.count()).select_from(ItemRow).where(ItemRow.queue == queue, ItemRow.batch == batch)
            )

    def next_item(
        self,
        annotator_id: int,
        queue: str,
        gold_rate: float = 0.1,
        exclude: Sequence[int] = (),
        rng: random.Random | None = None,
    ) -> Item | None:
        """The next item for this annotator, or None when the queue has no ordinary item left for them.

        With probability `gold_rate` a gold-check item they have not judged (gold items are checks on
        the work, shown to everyone regardless of `votes`, so they never keep a queue open by
        themselves). Otherwise an ordinary item: one that already has judgements but wants more comes
        first, so overlap completes; within the first `WINDOW` candidates the pick is random, so
        annotators asking at the same moment rarely collide.

        Each tier is read from its partial index in id order and stops at `WINDOW` items, so the
        cost does not grow with the queue.
        """
        rng = rng or random.Random()
        offered = [ItemRow.queue == queue, *([ItemRow.id.not_in(list(exclude))] if exclude else [])]
        unjudged = ~_judged_by(annotator_id)
        with self._reads.begin() as session:
            def first(*conditions) -> list[int]:
                return session.scalars(select(ItemRow.id).where(*offered, *conditions).order_by(ItemRow.id).limit(WINDOW)).all()

            candidates = first(unjudged, STARTED) or first(FRESH)  # nobody has judged a fresh item, this annotator included
            if not candidates:
                return None
            if rng.random() < gold_rate:
                gold = session.scalars(select(ItemRow.id).where(*offered, unjudged, GOLD).order_by(ItemRow.id)).all()
                if gold:
                    candidates = gold
            return _item(session.get(ItemRow, rng.choice(candidates)))

    # ------------------------------------------------------------ judgements

    def judge(self, annotator_id: int, item_id: int, choice: str, comment: str | None = None, ms: int | None = None) -> int:
        """Records one judgement in one transaction and returns its id; on any error nothing is written.

        The counts go up in the same transaction, after the insert: a refused duplicate rolls them back,
        and an insert waiting on a racing duplicate holds no row lock that other judges wait for.
        """
        check_judgement(choice, comment, ms)
        try:
            with self._writes.begin() as session:
                if session.get(AnnotatorRow, annotator_id) is None:
                    raise Unauthorized(f"no annotator {annotator_id}")
                item = session.get(ItemRow, item_id)
                if item is None:
                    raise UnknownItem(f"no item {item_id}")
                row = JudgementRow(
                    item_id=item_id, annotator_id=annotator_id, choice=choice, comment=comment or None, ms=ms, created_at=_now()
                )
                session.add(row)
                session.flush()
                self._count(session, {item_id: 1}, {(annotator_id, item.queue): 1}, {})
                return row.id
        except IntegrityError:  # the database's UNIQUE(item_id, annotator_id), so two racing requests cannot both pass
            raise AlreadyJudged(f"annotator {annotator_id} has already judged item {item_id}") from None

    def undo(self, annotator_id: int, queue: str) -> Item:
        """Withdraws this annotator's latest judgement in the queue; its item can be given to them again.

        The counts go down only when this call's DELETE removed the row: two undos racing for the same
        judgement (PostgreSQL) both answer its item, and the counts drop once.
        """
        with self._writes.begin() as session:
            found = session.execute(
                select(JudgementRow.id, JudgementRow.item_id)
                .join(ItemRow, ItemRow.id == JudgementRow.item_id)
                .where(JudgementRow.annotator_id == annotator_id, ItemRow.queue == queue)
                .order_by(JudgementRow.id.desc())
                .limit(1)
            ).first()
            if found is None:
                raise NothingToUndo(f"nothing to undo in queue {queue!r}")
            if session.execute(delete(JudgementRow).where(JudgementRow.id == found.id)).rowcount:
                self._count(session, {found.item_id: -1}, {(annotator_id, queue): -1}, {})
            return _item(session.get(ItemRow, found.item_id))

    def progress(self, annotator_id: int, queue: str) -> dict:
        """`judged`: this annotator's judgements in the queue, gold checks included; `remaining`: ordinary items still for them.

        `judged` is the annotator's tally; remaining is the queue's count of FRESH items (nobody has
        judged them, so neither has this annotator) and the STARTED items this annotator has not
        judged, which are few: overlap completes first. One statement, so that PostgreSQL reads all
        three at one snapshot.
        """
        tally = select(TallyRow.judgements).where(TallyRow.annotator_id == annotator_id, TallyRow.queue == queue)
        fresh = select(QueueRow.fresh).where(QueueRow.queue == queue)
        started = select(func.count()).where(ItemRow.queue == queue, STARTED, ~_judged_by(annotator_id))
        with self._reads.begin() as session:
            judged, remaining = session.execute(select(
                func.coalesce(tally.scalar_subquery(), 0),
                func.coalesce(fresh.scalar_subquery(), 0) + started.scalar_subquery(),
            )).one()
        return {"judged": judged, "remaining": remaining}

    def judgements(self, queue: str, purpose: str | None = "train", after_id: int = 0) -> list[dict]:
        """Every judgement after `after_id`, in id order, joined with its item; `purpose` None means all purposes."""
        with self._reads.begin() as session:
            rows = session.execute(
                _in_queue(select(JudgementRow, ItemRow, AnnotatorRow.name), queue, purpose)
                .join(AnnotatorRow, AnnotatorRow.id == JudgementRow.annotator_id)
                .where(JudgementRow.id > after_id)
                .order_by(JudgementRow.id)
            ).all()
        return [
            {
                "id": judgement.id,
                "item_id": item.id,
                "annotator": name,
                "choice": judgement.choice,
                "comment": judgement.comment,
                "ms": judgement.ms,
                "created_at": _iso(judgement.created_at),
                "prompt": json.loads(item.prompt),
                "response_a": item.response_a,
                "response_b": item.response_b,
                "policy_a": json.loads(item.policy_a),
                "policy_b": json.loads(item.policy_b),
                "purpose": item.purpose,
                "gold_choice": item.gold_choice,
            }
            for judgement, item, name in rows
        ]

    def import_records(self, records: Sequence[Record], batch: str = "import") -> dict:
        """Judgements from a file, in one transaction: items found by content within their queue or created,
        annotators found by name or created, judgements already present (same item and annotator) skipped.

        A created annotator gets a token nobody knows: they log in only after `add_annotator` issues one.
        A created item wants as many votes as the file has annotators for it, so it is not handed out again.
        """
        for record in records:
            check_item(_as_new_item(record))
            check_judgement(record.choice, record.comment, record.ms)
        voters: dict[tuple[str, str], set[str]] = defaultdict(set)
        for record in records:
            voters[record.queue, _content_key(record)].add(record.annotator)
        counts = Counter(items_created=0, annotators_created=0, judgements_created=0, duplicates_skipped=0)
        added: Counter[int] = Counter()  # judgements per item and per (annotator, queue), new items per queue: counted at the end
        tallied: Counter[tuple[int, str]] = Counter()
        fresh: Counter[str] = Counter()
        now = _now()
        with self._writes.begin() as session:
            annotators: dict[str, int] = {}
            items: dict[tuple[str, str], int] = {}
            judged: set[tuple[int, int]] = set()
            for record in records:
                if record.annotator not in annotators:
                    annotator_id = session.scalar(select(AnnotatorRow.id).where(AnnotatorRow.name == record.annotator))
                    if annotator_id is None:
                        row = AnnotatorRow(
                            name=record.annotator, token_hash=_sha256(secrets.token_urlsafe(32)), owner=False, created_at=now
                        )
                        session.add(row)
                        session.flush()
                        annotator_id, counts["annotators_created"] = row.id, counts["annotators_created"] + 1
                    annotators[record.annotator] = annotator_id
                key = (record.queue, _content_key(record))
                if key not in items:
                    item_id = session.scalar(
                        select(ItemRow.id)
                        .where(ItemRow.queue == key[0], ItemRow.content_key == key[1])
                        .order_by(ItemRow.id)
                        .limit(1)
                    )
                    if item_id is None:
                        new = _as_new_item(record, votes=len(voters[key]))
                        item_id = session.execute(
                            insert(ItemRow).returning(ItemRow.id), [_item_values(record.queue, batch, new, now)]
                        ).scalar_one()
                        counts["items_created"] += 1
                        fresh[record.queue] += new.gold_choice is None
                    items[key] = item_id
                pair = (items[key], annotators[record.annotator])
                if pair in judged or session.scalar(
                    select(JudgementRow.id).where(JudgementRow.item_id == pair[0], JudgementRow.annotator_id == pair[1])
                ):
                    counts["duplicates_skipped"] += 1
                    continue
                judged.add(pair)
                added[pair[0]] += 1
                tallied[pair[1], record.queue] += 1
                session.add(
                    JudgementRow(
                        item_id=pair[0], annotator_id=pair[1], choice=record.choice, comment=record.comment or None,
                        ms=record.ms, created_at=record.created_at or now,
                    )
                )
                counts["judgements_created"] += 1
            session.flush()
            self._count(session, added, tallied, fresh)
        return dict(counts)

    def _count(self, session, items: Mapping[int, int], tallies: Mapping[tuple[int, str], int], fresh: Mapping[str, int]) -> None:
        """Keeps the counts in step with what the caller's transaction wrote: judgements added (or, negative,
        withdrawn) per item and per (annotator id, queue), new FRESH items per queue.

        An item's count moving from or to 0 moves its queue's count of FRESH items as well. Atomic on
        either database: PostgreSQL locks each row until commit, SQLite's writers take turns. Always
        items, then tallies, then queues, each in sorted order: two transactions counting on the same
        rows lock them in the same order, and cannot deadlock.
        """
        connection, fresh = session.connection(), Counter(fresh)
        for item_id in sorted(items):
            by = items[item_id]
            now, queue, gold = connection.execute(_ADD_TO_ITEM, {"item": item_id, "by": by}).one()
            if gold is None:
                fresh[queue] += (now == 0) - (now == by)  # fresh again after an undo, or no longer after a first judgement
        for (annotator_id, queue), by in sorted(tallies.items()):
            connection.execute(self._add_to_tally, {"annotator_id": annotator_id, "queue": queue, "judgements": by})
        for queue, by in sorted(fresh.items()):
            if by:
                connection.execute(self._add_to_queue, {"queue": queue, "fresh": by})

    # ------------------------------------------------------------ what the pipeline reads

    def stats(self, queue: str) -> dict:
        """Per annotator, agreement between them, and the queue's state.

        Agreement is measured on ordinary items only: gold items are easy by design and measure
        accuracy instead (`gold_accuracy`), they would flatter agreement.
        """
        with self._reads.begin() as session:
            judged = session.execute(
                _in_queue(select(JudgementRow.item_id, JudgementRow.choice, AnnotatorRow.name, ItemRow.gold_choice), queue)
                .join(AnnotatorRow, AnnotatorRow.id == JudgementRow.annotator_id)
            ).all()
            items = session.execute(
                select(ItemRow.id, ItemRow.gold_choice, ItemRow.votes, func.count(JudgementRow.id))
                .outerjoin(JudgementRow, JudgementRow.item_id == ItemRow.id)
                .where(ItemRow.queue == queue)
                .group_by(ItemRow.id, ItemRow.gold_choice, ItemRow.votes)
            ).all()
        people: dict[str, Counter] = defaultdict(Counter)
        ordinary: dict[int, dict[str, str]] = defaultdict(dict)
        for item_id, choice, name, gold in judged:
            people[name]["judgements"] += 1
            if gold is None:
                ordinary[item_id][name] = choice
            else:
                people[name]["gold_judged"] += 1
                people[name]["gold_correct"] += choice == gold
        return {
            "annotators": [
                {
                    "name": name,
                    "judgements": tally["judgements"],
                    "gold_judged": tally["gold_judged"],
                    "gold_correct": tally["gold_correct"],
                    "gold_accuracy": tally["gold_correct"] / tally["gold_judged"] if tally["gold_judged"] else None,
                }
                for name, tally in sorted(people.items())
            ],
            "agreement": agreement(ordinary),
            "queue": {
                "items": len(items),
                "gold_items": sum(gold is not None for _, gold, _, _ in items),
                "pending": sum(gold is None and n < votes for _, gold, votes, n in items),
                "judged_items": sum(n > 0 for *_, n in items),
                "judgements": len(judged),
            },
        }

    def preference_pairs(self, queue: str, min_gold_accuracy: float | None = None) -> tuple[list[dict], dict]:
        """Chosen/rejected pairs from the ordinary "train" items, one per item whose kept judgements have a majority for A or B.

        Majority means more than half of the item's kept judgements; items whose majority is a tie or
        both-bad, or that have no majority, are dropped and counted. With `min_gold_accuracy`, annotators
        whose gold-check accuracy in this queue is below it are left out; annotators who have judged no
        gold item are kept (no evidence against them). A row's `votes` is the number of judgements for
        the winning choice.
        """
        with self._reads.begin() as session:
            judged = session.execute(
                _in_queue(select(JudgementRow.annotator_id, JudgementRow.item_id, JudgementRow.choice, ItemRow.gold_choice,
                                 ItemRow.purpose), queue)
            ).all()
            items = {
                row.id: row
                for row in session.scalars(
                    select(ItemRow).where(ItemRow.queue == queue, ItemRow.purpose == "train", ItemRow.gold_choice.is_(None))
                )
            }
        gold: dict[int, list[bool]] = defaultdict(list)
        for annotator_id, _, choice, gold_choice, _ in judged:
            if gold_choice is not None:
                gold[annotator_id].append(choice == gold_choice)
        left_out = {
            annotator_id for annotator_id, correct in gold.items()
            if min_gold_accuracy is not None and sum(correct) / len(correct) < min_gold_accuracy
        }
        tallies: dict[int, Counter] = defaultdict(Counter)
        for annotator_id, item_id, choice, _, _ in judged:
            if item_id in items and annotator_id not in left_out:
                tallies[item_id][choice] += 1
        counts = Counter(judged_items=len(tallies), pairs=0, ties=0, both_bad=0, no_majority=0,
                         annotators_left_out=len(left_out), judgements=sum(t.total() for t in tallies.values()))
        rows = []
        for item_id in sorted(tallies):
            choice, votes = tallies[item_id].most_common(1)[0]
            if 2 * votes <= sum(tallies[item_id].values()):
                counts["no_majority"] += 1
            elif choice == "tie":
                counts["ties"] += 1
            elif choice == "both_bad":
                counts["both_bad"] += 1
            else:
                item = items[item_id]
                chosen, rejected = (item.response_a, item.response_b) if choice == "A" else (item.response_b, item.response_a)
                rows.append({
                    "item_id": item_id,
                    "prompt": json.loads(item.prompt),
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                    "votes": votes,
                })
                counts["pairs"] += 1
        return rows, dict(counts)

    def digest(self, queue: str, purpose: str | None = "train") -> str:
        """sha256 of the judged rows (judgement id, item id, annotator id, choice) in id order.

        Ids are never reused, so it changes exactly when a judgement is added or withdrawn: what a
        stage fingerprints to know whether the human data changed.
        """
        digest = hashlib.sha256()
        with self._reads.begin() as session:
            rows = session.execute(
                _in_queue(
                    select(JudgementRow.id, JudgementRow.item_id, JudgementRow.annotator_id, JudgementRow.choice), queue, purpose
                ).order_by(JudgementRow.id)
            )
            for row in rows:
                digest.update(("%d,%d,%d,%s\n" % tuple(row)).encode())
        return digest.hexdigest()

    def count_judgements(self, queue: str, purpose: str | None = "train", after_id: int = 0) -> int:
        with self._reads.begin() as session:
            query = _in_queue(select(func.count(JudgementRow.id)), queue, purpose)
            return session.scalar(query.where(JudgementRow.id > after_id))

    def last_judgement_id(self, queue: str, purpose: str | None = "train") -> int:
        with self._reads.begin() as session:
            return session.scalar(_in_queue(select(func.max(JudgementRow.id)), queue, purpose)) or 0

    def mark(self, queue: str, name: str) -> int | None:
        """A named watermark, e.g. the last judgement id that a completed pipeline run trained on."""
        with self._reads.begin() as session:
            return session.scalar(select(MarkRow.judgement_id).where(MarkRow.queue == queue, MarkRow.name == name))

    def set_mark(self, queue: str, name: str, judgement_id: int) -> None:
        with self._writes.begin() as session:
            row = session.scalar(select(MarkRow).where(MarkRow.queue == queue, MarkRow.name == name))
            if row is None:
                session.add(MarkRow(queue=queue, name=name, judgement_id=judgement_id))
            else:
                row.judgement_id = judgement_id


# ------------------------------------------------------------ SQLite


def _sqlite_connect(dbapi_connection, _record) -> None:
    """WAL lets readers work while one writes; synchronous=FULL makes a commit durable before it is
    acknowledged (WAL alone already survives kill -9 of the process; FULL also survives power loss,
    worth an fsync at the pace people judge)."""
    dbapi_connection.isolation_level = None  # the driver's implicit transactions off: `_sqlite_begin` opens them
    cursor = dbapi_connection.cursor()
    for pragma in (f"busy_timeout={BUSY_TIMEOUT_MS}", "journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _sqlite_begin(connection) -> None:
    """Writers take the write lock at BEGIN: a deferred transaction that reads, then writes after
    another writer committed, fails at once instead of waiting out busy_timeout."""
    connection.exec_driver_sql("BEGIN" if connection.get_execution_options().get("label_store_reads") else "BEGIN IMMEDIATE")


# ------------------------------------------------------------ queries and rows


def _in_queue(query, queue: str, purpose: str | None = None):
    """`query` over judgements, limited to the items of `queue` (and `purpose`, unless None)."""
    query = query.select_from(JudgementRow).join(ItemRow, ItemRow.id == JudgementRow.item_id).where(ItemRow.queue == queue)
    return query if purpose is None else query.where(ItemRow.purpose == purpose)


# The statements that keep the counts, built once: building one per call costs SQLAlchemy more CPU than the
# database takes to run it, and judge() runs two or three.
_ADD_TO_ITEM = (
    update(ItemRow.__table__)
    .where(ItemRow.id == bindparam("item"))
    .values(judgements=ItemRow.judgements + bindparam("by"))
    .returning(ItemRow.judgements, ItemRow.queue, ItemRow.gold_choice)
)


def _adding(upsert, row: type, column: str):
    """INSERT of a row, or where its primary key is taken, an addition of its `column` to that row's."""
    table = row.__table__
    statement = upsert(table)
    return statement.on_conflict_do_update(
        index_elements=[key.name for key in table.primary_key], set_={column: table.c[column] + statement.excluded[column]}
    )


def _judged_by(annotator_id: int):
    """The condition on an item that this annotator has judged it: one index probe per item read.

    Not IN (their ids), which collects everything the annotator ever judged. OFFSET 0 keeps
    PostgreSQL from turning the EXISTS into an anti-join over all the annotator's judgements, which
    it would, as it cannot estimate `judgements < votes` and expects many STARTED items.
    """
    mine = select(JudgementRow.id).where(JudgementRow.item_id == ItemRow.id, JudgementRow.annotator_id == annotator_id)
    return mine.offset(0).exists()


def _as_new_item(record: Record, votes: int = 1) -> NewItem:
    return NewItem(record.prompt, record.response_a, record.response_b, record.policy_a, record.policy_b,
                   record.purpose, record.gold_choice, votes)


def _content_key(item: NewItem | Record) -> str:
    return _sha256(json.dumps([item.prompt, item.response_a, item.response_b], sort_keys=True, ensure_ascii=False))


def _item_values(queue: str, batch: str, item: NewItem, now: datetime) -> dict:
    return {
        "queue": queue, "batch": batch, "content_key": _content_key(item), "prompt": _json(item.prompt),
        "response_a": item.response_a, "response_b": item.response_b, "policy_a": _json(item.policy_a),
        "policy_b": _json(item.policy_b), "purpose": item.purpose, "gold_choice": item.gold_choice,
        "votes": item.votes, "score_gap": item.score_gap, "created_at": now,
    }


def _item(row: ItemRow) -> Item:
    return Item(row.id, row.queue, json.loads(row.prompt), row.response_a, row.response_b, row.purpose)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    """UTC, whatever the database returns (SQLite keeps no zone: what it holds was written in UTC)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc).isoformat()
