"""The label store (rlhf/labels/), every store test on SQLite and on PostgreSQL.

PostgreSQL is the one `infra/local-up postgres` starts, on a spare port in a temporary directory,
once for the session; each test gets a fresh database in it.
"""

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from rlhf.errors import InputError
from rlhf.labels.agreement import agreement, cohen_kappa, fleiss_kappa
from rlhf.labels.exchange import export_judgements, import_judgements
from rlhf.labels.schema import Base
from rlhf.labels.store import (
    MAX_COMMENT,
    MIGRATIONS,
    AlreadyJudged,
    BadJudgement,
    LabelStore,
    NewItem,
    NothingToUndo,
    Unauthorized,
    UnknownItem,
    store_url,
)

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _admin(url: str) -> str:
    """psycopg's URL of the cluster's `postgres` database, from the store's URL of another."""
    return make_url(url).set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres() -> str:
    """The URL of the `labels` database of a PostgreSQL started by infra/local-up; stopped by infra/local-down."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("no PostgreSQL server installed (apt-get install postgresql)")
    directory = Path(tempfile.mkdtemp(prefix="rlhf-labels-", dir="/tmp"))
    directory.chmod(0o755)  # PostgreSQL runs as user postgres, who must reach it
    env = os.environ | {"RLHF_POSTGRES_PORT": str(_free_port())}
    try:
        up = subprocess.run([ROOT / "infra" / "local-up", "postgres", "--dir", directory],
                            capture_output=True, text=True, env=env, timeout=300)
        assert up.returncode == 0, up.stderr[-3000:]
        url = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.M))["RLHF_LABELS_URL"]
        with psycopg.connect(_admin(url), autocommit=True) as connection:  # a throw-away cluster: stopping it need not flush
            connection.execute("ALTER SYSTEM SET fsync = off")
            connection.execute("SELECT pg_reload_conf()")
        yield url
    finally:
        down = subprocess.run([ROOT / "infra" / "local-down", "postgres", "--dir", directory],
                              capture_output=True, text=True, env=env, timeout=120)
        shutil.rmtree(directory, ignore_errors=True)
        assert down.returncode == 0, down.stderr[-3000:]


@pytest.fixture(params=["sqlite", "postgresql"])
def new_url(request, tmp_path):
    """Makes URLs of fresh, empty databases of the backend under test."""
    if request.param == "sqlite":
        return lambda: f"sqlite:///{tmp_path / uuid.uuid4().hex}/labels.db"
    labels = request.getfixturevalue("postgres")

    def fresh() -> str:
        name = f"labels_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(_admin(labels), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return make_url(labels).set(database=name).render_as_string(hide_password=False)

    return fresh


@pytest.fixture
def open_store(new_url):
    """Opens stores on fresh databases, closing them after the test."""
    stores = []

    def opener(url: str | None = None) -> LabelStore:
        stores.append(LabelStore(url or new_url()))
        return stores[-1]

    yield opener
    for store in stores:
        store.close()


@pytest.fixture
def store(open_store) -> LabelStore:
    return open_store()


def _items(n: int, votes: int = 1, purpose: str = "train", tag: str = "q") -> list[NewItem]:
    return [
        NewItem([{"role": "user", "content": f"{tag} {i}"}], f"{tag} {i} a", f"{tag} {i} b",
                {"stage": "sft", "role": "baseline"}, {"stage": "ppo", "role": "candidate"}, purpose=purpose, votes=votes)
        for i in range(n)
    ]


def _gold(n: int, answer: str = "A") -> list[NewItem]:
    return [NewItem([{"role": "user", "content": f"gold {i}"}], f"gold {i} good", f"gold {i} bad", {}, {}, gold_choice=answer)
            for i in range(n)]


def _people(store: LabelStore, *names: str) -> dict[str, int]:
    return {name: store.authenticate(store.add_annotator(name)).id for name in names}


def _ids(store: LabelStore, queue: str) -> list[int]:
    with store.engine.connect() as connection:
        return list(connection.scalars(text("SELECT id FROM items WHERE queue = :q ORDER BY id"), {"q": queue}))


# ------------------------------------------------------------ schema and migrations


def test_migration_creates_the_schema_at_head_and_reopening_changes_nothing(store):
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    with store.engine.connect() as connection:
        assert connection.scalar(text("SELECT version_num FROM alembic_version")) == head == "0002"
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []  # the ORM is what the migration made
        declared, stored = _partial_indexes(connection)
        assert declared == stored and len(stored) == 3
    people = _people(store, "ann")
    store.add_items("q", "b1", _items(2))
    store.judge(people["ann"], _ids(store, "q")[0], "A")
    digest = store.digest("q")
    store.close()
    again = LabelStore(store.engine.url.render_as_string(hide_password=False))
    try:
        assert set(inspect(again.engine).get_table_names()) == {"alembic_version", "annotators", "items", "judgements",
                                                                 "batches", "marks", "tallies", "queues"}
        assert again.digest("q") == digest and again.count_judgements("q") == 1
    finally:
        again.close()


def _partial_indexes(connection) -> tuple[dict[str, str], dict[str, str]]:
    """The WHERE of each partial index on items, as schema.py declares it and as the database holds it,
    without brackets, spaces or table names: compare_metadata leaves them out."""
    backend = connection.dialect.name

    def plain(where) -> str:  # PostgreSQL reflects text, SQLite a clause
        sql = where if isinstance(where, str) else str(where.compile(dialect=connection.dialect, compile_kwargs={"literal_binds": True}))
        return re.sub(r"[()\s]|items\.", "", sql).lower()

    declared = {index.name: plain(index.dialect_options[backend]["where"]) for index in Base.metadata.tables["items"].indexes
                if index.dialect_options[backend]["where"] is not None}
    stored = {index["name"]: plain(index["dialect_options"][f"{backend}_where"]) for index in inspect(connection).get_indexes("items")
              if f"{backend}_where" in index["dialect_options"]}
    return declared, stored


def _migrate(url: str, revision: str, direction: str = "upgrade") -> None:
    """Alembic to `revision`, as `LabelStore` runs it but to any revision (the store goes to head)."""
    if make_url(url).get_backend_name() == "sqlite":
        Path(make_url(url).database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            getattr(command, direction)(config, revision)
    finally:
        engine.dispose()


def test_a_store_with_judgements_at_0001_upgrades_with_their_counts_and_downgrades(new_url):
    url = new_url()
    _migrate(url, "0001")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO annotators (id, name, token_hash, owner, created_at) VALUES "
                                "(1, 'ann', 'h1', false, CURRENT_TIMESTAMP), (2, 'bob', 'h2', false, CURRENT_TIMESTAMP)"))
        for item, gold, votes in [(1, None, 2), (2, None, 2), (3, None, 1), (4, "A", 1), (5, None, 2)]:
            connection.execute(text(
                "INSERT INTO items (id, queue, batch, content_key, prompt, response_a, response_b, policy_a, policy_b, "
                "purpose, gold_choice, votes, created_at) VALUES (:id, :queue, 'b1', :key, :prompt, 'a', 'b', '{}', '{}', "
                "'train', :gold, :votes, CURRENT_TIMESTAMP)"
            ), {"id": item, "queue": "other" if item == 5 else "q", "key": f"k{item}",
                "prompt": json.dumps([{"role": "user", "content": f"p{item}"}]), "gold": gold, "votes": votes})
        for annotator, item in [(1, 1), (2, 1), (1, 2), (2, 4), (1, 5)]:
            connection.execute(text("INSERT INTO judgements (item_id, annotator_id, choice, created_at) "
                                    "VALUES (:item, :annotator, 'A', CURRENT_TIMESTAMP)"), {"item": item, "annotator": annotator})
    engine.dispose()

    store = LabelStore(url)
    try:
        with store.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            counts = dict(connection.execute(text("SELECT id, judgements FROM items")).all())
            tallies = {tuple(row[:2]): row[2] for row in connection.execute(text("SELECT annotator_id, queue, judgements FROM tallies"))}
        assert counts == {1: 2, 2: 1, 3: 0, 4: 1, 5: 1}
        assert tallies == {(1, "q"): 2, (2, "q"): 2, (1, "other"): 1}
        _assert_counts_are_exact(store)
        # item 1 has its votes, 2 wants bob's, 3 nobody's yet; ann judged 1 and 2 in q (and 5 in another queue)
        assert store.progress(1, "q") == {"judged": 2, "remaining": 1}
        assert store.progress(2, "q") == {"judged": 2, "remaining": 2}
        assert store.next_item(2, "q", gold_rate=0).id == 2  # started items first
        store.judge(2, 2, "B")
        assert store.undo(1, "q").id == 2
        with store.engine.connect() as connection:
            assert connection.scalar(text("SELECT judgements FROM items WHERE id = 2")) == 1
    finally:
        store.close()

    _migrate(url, "0001", "downgrade")
    engine = create_engine(url)
    try:
        assert "judgements" not in {column["name"] for column in inspect(engine).get_columns("items")}
        assert not {"tallies", "queues"} & set(inspect(engine).get_table_names())
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT count(*) FROM judgements")) == 5
    finally:
        engine.dispose()
    again = LabelStore(url)  # and up again, counting afresh
    try:
        with again.engine.connect() as connection:
            assert dict(connection.execute(text("SELECT id, judgements FROM items")).all()) == {1: 2, 2: 1, 3: 0, 4: 1, 5: 1}
    finally:
        again.close()


def test_opening_one_store_from_many_threads_at_once_migrates_it_once(new_url):
    url, errors, opened = new_url(), [], []

    def open_it():
        try:
            opened.append(LabelStore(url))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in opened:
        store.close()
    assert not errors and len(opened) == 4


def test_the_database_itself_refuses_a_second_judgement_and_a_choice_outside_the_list(store):
    people = _people(store, "ann")
    store.add_items("q", "b1", _items(1))
    item = _ids(store, "q")[0]
    store.judge(people["ann"], item, "A")
    insert = text("INSERT INTO judgements (item_id, annotator_id, choice, created_at) VALUES (:i, :a, :c, CURRENT_TIMESTAMP)")
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(insert, {"i": item, "a": people["ann"], "c": "B"})
    other = _people(store, "bob")["bob"]
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(insert, {"i": item, "a": other, "c": "C"})
    assert store.count_judgements("q") == 1


# ------------------------------------------------------------ annotators, items, judgements


def test_tokens_are_stored_hashed_and_a_new_one_replaces_the_old(store):
    first = store.add_annotator("ann", owner=True)
    ann = store.authenticate(first)
    assert (ann.name, ann.owner) == ("ann", True)
    with store.engine.connect() as connection:
        assert connection.scalar(text("SELECT token_hash FROM annotators")) == hashlib.sha256(first.encode()).hexdigest()
    second = store.add_annotator("ann", owner=True)
    assert store.authenticate(first) is None and store.authenticate(second) == ann
    assert store.authenticate("not a token") is None


def test_a_batch_is_added_once(store):
    assert store.add_items("q", "b1", _items(3)) == 3
    assert store.add_items("q", "b1", _items(5)) == 3  # the stage reran: nothing new
    assert store.add_items("q", "b2", _items(2, tag="r")) == 2
    assert store.add_items("other", "b1", _items(1)) == 1  # batches are per queue
    assert store.stats("q")["queue"]["items"] == 5
    with pytest.raises(ValueError, match="gold_choice"):
        store.add_items("q", "b3", [NewItem([{"role": "user", "content": "x"}], "a", "b", {}, {}, gold_choice="C")])
    assert store.stats("q")["queue"]["items"] == 5


def test_judge_refuses_bad_requests_and_writes_nothing(store):
    people = _people(store, "ann")
    store.add_items("q", "b1", _items(1))
    item = _ids(store, "q")[0]
    first = store.judge(people["ann"], item, "tie", comment="close", ms=1200)
    digest = store.digest("q")
    refusals = [
        (AlreadyJudged, dict(annotator_id=people["ann"], item_id=item, choice="B")),
        (UnknownItem, dict(annotator_id=people["ann"], item_id=item + 99, choice="A")),
        (Unauthorized, dict(annotator_id=people["ann"] + 99, item_id=item, choice="A")),
        (BadJudgement, dict(annotator_id=people["ann"], item_id=item, choice="C")),
        (BadJudgement, dict(annotator_id=people["ann"], item_id=item, choice="A", comment="x" * (MAX_COMMENT + 1))),
        (BadJudgement, dict(annotator_id=people["ann"], item_id=item, choice="A", ms=-1)),
        (BadJudgement, dict(annotator_id=people["ann"], item_id=item, choice="A", ms=86_400_001)),
    ]
    for error, request in refusals:
        with pytest.raises(error) as raised:
            store.judge(**request)
        assert raised.value.status == {AlreadyJudged: 409, UnknownItem: 404, Unauthorized: 401, BadJudgement: 422}[error]
    assert store.digest("q") == digest and store.last_judgement_id("q") == first
    with store.engine.connect() as connection:
        assert connection.scalar(text("SELECT judgements FROM items")) == 1  # the refused duplicate's count rolled back with it
    assert [(j["choice"], j["comment"], j["ms"]) for j in store.judgements("q")] == [("tie", "close", 1200)]


def test_next_item_completes_overlap_first_mixes_in_gold_and_respects_votes(store):
    people = _people(store, "ann", "bob", "cat")
    store.add_items("q", "b1", _items(4, votes=2) + _gold(2))
    ordinary, gold = _ids(store, "q")[:4], _ids(store, "q")[4:]
    rng = random.Random(0)
    first = store.next_item(people["ann"], "q", gold_rate=0, rng=rng)
    assert first.id in ordinary and first.purpose == "train" and not hasattr(first, "gold_choice")
    store.judge(people["ann"], first.id, "A")
    assert store.next_item(people["bob"], "q", gold_rate=0, rng=rng).id == first.id  # wants one more vote: it comes first
    assert store.next_item(people["bob"], "q", gold_rate=0, exclude=[first.id], rng=rng).id != first.id
    store.judge(people["bob"], first.id, "B")
    assert all(store.next_item(people["cat"], "q", gold_rate=0, rng=rng).id != first.id for _ in range(20))  # votes reached
    assert store.next_item(people["cat"], "q", gold_rate=1, rng=rng).id in gold
    assert store.progress(people["ann"], "q") == {"judged": 1, "remaining": 3}
    for item in set(ordinary) - {first.id}:
        store.judge(people["ann"], item, "A")
    assert store.next_item(people["ann"], "q", gold_rate=0, rng=rng) is None
    assert store.next_item(people["ann"], "q", gold_rate=1, rng=rng) is None  # gold checks alone do not keep a queue open
    assert store.progress(people["ann"], "q") == {"judged": 4, "remaining": 0}


def test_next_item_and_progress_read_no_table_whole_on_sqlite(tmp_path):
    """What the page asks on every request is read through indexes: its cost does not grow with the queue."""
    store = LabelStore(f"sqlite:///{tmp_path}/labels.db")
    try:
        people = _people(store, "ann", "bob")
        store.add_items("q", "b1", _items(30, votes=2) + _gold(3))
        store.judge(people["ann"], _ids(store, "q")[0], "A")
        statements = []

        def record(connection, cursor, sql, parameters, *_):
            statements.append((sql, parameters))

        event.listen(store.engine, "before_cursor_execute", record)
        store.next_item(people["bob"], "q", gold_rate=1, exclude=[5])
        store.next_item(people["ann"], "q", gold_rate=0)  # nothing started for ann: the fresh items
        store.progress(people["bob"], "q")
        event.remove(store.engine, "before_cursor_execute", record)
        with store.engine.connect() as connection:
            plans = [row[3] for sql, parameters in statements if sql.startswith("SELECT")
                     for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", parameters)]
        assert plans and not [step for step in plans if step.startswith("SCAN") and step != "SCAN CONSTANT ROW"], plans
        assert not [step for step in plans if "TEMP B-TREE" in step], plans
        items = [step for step in plans if step.startswith("SEARCH items ")]  # by id, or only the items of one tier
        assert items and all(re.search(r"ix_items_queue_(fresh|started|gold) |INTEGER PRIMARY KEY", step) for step in items), plans
    finally:
        store.close()


def test_undo_withdraws_the_latest_judgement_and_the_digest_follows_judgements_only(store):
    people = _people(store, "ann", "bob")
    store.add_items("q", "b1", _items(3))
    store.add_items("gate", "b1", _items(1, purpose="gate"))
    items = _ids(store, "q")
    empty = store.digest("q")
    with pytest.raises(NothingToUndo):
        store.undo(people["ann"], "q")
    store.judge(people["ann"], items[0], "A")
    one = store.digest("q")
    store.judge(people["ann"], items[1], "B")
    two = store.digest("q")
    assert len({empty, one, two}) == 3
    for read in (store.stats, store.preference_pairs, store.judgements):
        read("q")
    store.next_item(people["bob"], "q")
    store.add_items("q", "b2", _items(1, tag="more"))
    store.judge(people["bob"], _ids(store, "gate")[0], "A")  # another queue
    assert store.digest("q") == two
    assert store.undo(people["ann"], "q").id == items[1]
    assert store.digest("q") == one and store.count_judgements("q") == 1
    assert store.undo(people["ann"], "q").id == items[0]
    assert store.digest("q") == empty
    _assert_counts_are_exact(store)
    with pytest.raises(NothingToUndo):
        store.undo(people["ann"], "q")
    store.judge(people["ann"], items[0], "A")  # the same choice again is a new judgement
    assert store.digest("q") not in (empty, one)


def test_judgements_counts_and_marks(store):
    people = _people(store, "ann")
    store.add_items("q", "b1", _items(2) + _items(1, purpose="gate", tag="g"))
    train, gate = _ids(store, "q")[:2], _ids(store, "q")[2]
    ids = [store.judge(people["ann"], item, "A") for item in train]
    store.judge(people["ann"], gate, "B")
    assert [row["item_id"] for row in store.judgements("q")] == train
    assert [row["item_id"] for row in store.judgements("q", purpose=None)] == [*train, gate]
    assert [row["id"] for row in store.judgements("q", after_id=ids[0])] == ids[1:]
    row = store.judgements("q", purpose="gate")[0]
    assert row["policy_a"] == {"stage": "sft", "role": "baseline"} and row["annotator"] == "ann"
    assert row["created_at"].endswith("+00:00")
    assert (store.count_judgements("q"), store.count_judgements("q", after_id=ids[0]), store.count_judgements("q", "gate")) == (2, 1, 1)
    assert (store.last_judgement_id("q"), store.last_judgement_id("empty")) == (ids[1], 0)
    assert store.mark("q", "trained") is None
    store.set_mark("q", "trained", ids[0])
    store.set_mark("q", "trained", ids[1])
    assert (store.mark("q", "trained"), store.mark("other", "trained")) == (ids[1], None)


# ------------------------------------------------------------ what the pipeline reads


def test_preference_pairs_majorities_ties_both_bad_and_gold_filtering(store):
    people = _people(store, "ann", "bob", "cat", "dan")
    store.add_items("q", "b1", _items(5, votes=2) + _items(1, purpose="gate", tag="g") + _gold(1))
    i1, i2, i3, i4, i5, gate, gold = _ids(store, "q")
    votes = {
        i1: {"ann": "A", "bob": "A", "cat": "B", "dan": "A"},
        i2: {"ann": "tie", "bob": "tie", "cat": "A"},
        i3: {"ann": "both_bad", "bob": "B", "cat": "both_bad"},
        i4: {"ann": "A", "bob": "B"},
        i5: {"ann": "B", "cat": "A"},
        gate: {"ann": "A"},
        gold: {"ann": "A", "bob": "A", "cat": "B"},  # cat fails the gold check; dan judged none
    }
    for item, by in votes.items():
        for name, choice in by.items():
            store.judge(people[name], item, choice)

    rows, counts = store.preference_pairs("q")
    assert counts == {"judged_items": 5, "pairs": 1, "ties": 1, "both_bad": 1, "no_majority": 2,
                      "annotators_left_out": 0, "judgements": 14}
    assert rows == [{"item_id": i1, "prompt": [{"role": "user", "content": "q 0"}], "chosen": [{"role": "assistant", "content": "q 0 a"}],
                     "rejected": [{"role": "assistant", "content": "q 0 b"}], "votes": 3}]

    rows, counts = store.preference_pairs("q", min_gold_accuracy=0.5)
    assert counts == {"judged_items": 5, "pairs": 2, "ties": 1, "both_bad": 0, "no_majority": 2,
                      "annotators_left_out": 1, "judgements": 10}
    assert [(row["item_id"], row["chosen"][0]["content"], row["votes"]) for row in rows] == [(i1, "q 0 a", 3), (i5, "q 4 b", 1)]

    stats = store.stats("q")
    assert stats["annotators"] == [
        {"name": "ann", "judgements": 7, "gold_judged": 1, "gold_correct": 1, "gold_accuracy": 1.0},
        {"name": "bob", "judgements": 5, "gold_judged": 1, "gold_correct": 1, "gold_accuracy": 1.0},
        {"name": "cat", "judgements": 5, "gold_judged": 1, "gold_correct": 0, "gold_accuracy": 0.0},
        {"name": "dan", "judgements": 1, "gold_judged": 0, "gold_correct": 0, "gold_accuracy": None},
    ]
    assert stats["queue"] == {"items": 7, "gold_items": 1, "pending": 0, "judged_items": 7, "judgements": 18}
    ordinary = {item: by for item, by in votes.items() if item != gold}
    assert stats["agreement"] == agreement(ordinary)
    ann_bob = next(pair for pair in stats["agreement"]["pairs"] if (pair["a"], pair["b"]) == ("ann", "bob"))
    # ann/bob share i1..i4: observed 2/4; chance (A: 2x1 + tie: 1x1) / 16 = 3/16; kappa = (1/2 - 3/16) / (13/16)
    assert ann_bob["items"] == 4 and ann_bob["kappa"] == pytest.approx(5 / 13)
    assert stats["agreement"]["overlapping_items"] == 5


def test_an_acknowledged_judgement_survives_kill_9_of_its_process(store):
    people = _people(store, "ann")
    store.add_items("q", "b1", _items(1))
    script = (
        "import os, signal, sys\n"
        "from rlhf.labels.store import LabelStore\n"
        "print(LabelStore(sys.argv[1]).judge(int(sys.argv[2]), int(sys.argv[3]), 'A'), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    url = store.engine.url.render_as_string(hide_password=False)
    killed = subprocess.run([sys.executable, "-c", script, url, str(people["ann"]), str(_ids(store, "q")[0])],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [row["id"] for row in store.judgements("q")] == [int(killed.stdout)]


def test_two_annotators_in_two_threads_each_lose_nothing_and_racing_duplicates_are_refused(store):
    people = _people(store, "ann", "bob", "cat")
    store.add_items("q", "b1", _items(25, votes=3))
    items = _ids(store, "q")
    done, refused, errors = [], [], []

    def judge_all(name: str, order: list[int]):
        try:
            for item in order:
                try:
                    done.append(store.judge(people[name], item, random.choice("AB")))
                except AlreadyJudged:
                    refused.append((name, item))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=judge_all, args=args) for args in
               [("ann", items), ("bob", items[::-1]), ("cat", items), ("cat", items[::-1])]]  # cat twice, at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(done) == len(set(done)) == 75 and len(refused) == 25 and {name for name, _ in refused} == {"cat"}
    assert store.count_judgements("q") == 75 and sorted(row["id"] for row in store.judgements("q")) == sorted(done)


def test_counts_stay_exact_with_20_annotators_judging_and_undoing_at_once(store):
    people = _people(store, *(f"a{n}" for n in range(20)))
    store.add_items("q", "b1", _items(40, votes=3) + _gold(4))
    items = _ids(store, "q")
    errors = []

    def work(name: str, seed: int):
        rng = random.Random(seed)
        try:
            for _ in range(10):
                item = store.next_item(people[name], "q", gold_rate=0.1, rng=rng)
                target = item.id if item and rng.random() < 0.8 else rng.choice(items)  # now and then a duplicate or a full item
                try:
                    store.judge(people[name], target, rng.choice("AB"))
                except AlreadyJudged:
                    pass
                if rng.random() < 0.25:
                    try:
                        store.undo(people[name], "q")
                    except NothingToUndo:
                        pass
        except Exception as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    # each annotator in a thread, four of them in two at once (two tabs: duplicates and undos race)
    threads = [threading.Thread(target=work, args=(f"a{n % 20}", n)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with store.engine.connect() as connection:
        items = {row.id: row for row in connection.execute(text("SELECT id, gold_choice, votes, judgements FROM items"))}
        judged = connection.execute(text("SELECT item_id, annotator_id FROM judgements")).all()
    _assert_counts_are_exact(store)
    assert len(judged) > 100
    for annotator in people.values():  # what progress meant when it counted judgements on every call
        mine = {item for item, who in judged if who == annotator}
        remaining = sum(row.gold_choice is None and row.judgements < row.votes and id not in mine for id, row in items.items())
        assert store.progress(annotator, "q") == {"judged": len(mine), "remaining": remaining}


def test_two_undos_racing_for_one_judgement_lower_the_counts_once(store, monkeypatch):
    ann = _people(store, "ann")["ann"]
    store.add_items("q", "b1", _items(1, votes=2))
    item = _ids(store, "q")[0]
    store.judge(ann, item, "A")
    count = store._count

    def slowly(*args):  # the first undo has deleted the judgement; the second meanwhile finds it too (PostgreSQL),
        time.sleep(0.5)  # then waits on its row, or waits to begin (SQLite)
        count(*args)

    monkeypatch.setattr(store, "_count", slowly)
    outcomes = []
    undos = [threading.Thread(target=lambda: outcomes.append(_outcome(store.undo, ann, "q"))) for _ in range(2)]
    for undo in undos:
        undo.start()
    for undo in undos:
        undo.join()
    assert item in outcomes and set(outcomes) <= {item, NothingToUndo}
    _assert_counts_are_exact(store)
    assert store.progress(ann, "q") == {"judged": 0, "remaining": 1}


def _assert_counts_are_exact(store: LabelStore) -> None:
    """Each item's count, each annotator's tally in a queue and each queue's count of fresh items are what
    counting gives."""
    with store.engine.connect() as connection:
        def rows(sql: str) -> list[tuple]:
            return sorted(tuple(row) for row in connection.execute(text(sql)))

        assert rows("SELECT id, judgements FROM items") == rows(
            "SELECT items.id, count(j.id) FROM items LEFT JOIN judgements AS j ON j.item_id = items.id GROUP BY items.id")
        assert rows("SELECT annotator_id, queue, judgements FROM tallies WHERE judgements > 0") == rows(
            "SELECT j.annotator_id, i.queue, count(*) FROM judgements AS j JOIN items AS i ON i.id = j.item_id "
            "GROUP BY j.annotator_id, i.queue")
        assert rows("SELECT queue, fresh FROM queues WHERE fresh > 0") == rows(
            "SELECT queue, count(*) FROM items WHERE gold_choice IS NULL AND judgements = 0 GROUP BY queue")


def _outcome(call, *args):
    """What `call` returned (an item's id), or the class of the LabelError it raised."""
    try:
        return call(*args).id
    except Exception as exc:  # noqa: BLE001 - the test compares it
        return type(exc)


# ------------------------------------------------------------ import and export


def _filled(store: LabelStore) -> None:
    people = _people(store, "ann", "bob")
    store.add_items("q", "b1", _items(3, votes=2) + _items(1, purpose="gate", tag="g") + _gold(1, "B"))
    items = _ids(store, "q")
    store.add_items("q", "b1-multi", [NewItem([{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi ü"}],
                                              "hello\u2028there\x85", "go away", {"stage": "sft"}, {"stage": "ppo"})])
    items = _ids(store, "q")
    for name, choices in {"ann": ["A", "tie", "both_bad", "A", "B", "B"], "bob": ["B", "tie", "A", None, "A", None]}.items():
        for item, choice in zip(items, choices):
            if choice:
                store.judge(people[name], item, choice, comment=f"{name} on {item}" if choice == "tie" else None, ms=1500)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_export_and_import_round_trip(open_store, tmp_path, suffix):
    source, target = open_store(), open_store()
    _filled(source)
    exported = tmp_path / f"judgements{suffix}"
    assert export_judgements(source, "q", exported) == 10
    counts = import_judgements(target, exported)
    assert counts == {"items_created": 6, "annotators_created": 2, "judgements_created": 10, "duplicates_skipped": 0,
                      "empty_skipped": 0}
    assert import_judgements(target, exported)["duplicates_skipped"] == 10  # a second import adds nothing
    for store in (source, target):
        _assert_counts_are_exact(store)
    export_judgements(source, "q", tmp_path / "source.jsonl")
    export_judgements(target, "q", tmp_path / "target.jsonl")
    source_lines, target_lines = ((tmp_path / f"{name}.jsonl").read_text().split("\n") for name in ("source", "target"))
    if suffix == ".jsonl":
        assert target_lines == source_lines
    else:  # Label Studio groups judgements by task: the same judgements, in item order
        assert sorted(target_lines) == sorted(source_lines)
    assert target.stats("q")["queue"]["pending"] == 0  # imported items want the votes they came with
    assert target.preference_pairs("q") == source.preference_pairs("q")
    token = target.add_annotator("ann")  # imported annotators log in once given a token
    assert target.authenticate(token).name == "ann"


def test_label_studio_pairwise_results_read_as_choices(store, tmp_path):
    tasks = [
        {"id": 7, "data": {"prompt": "Which is kinder?", "answer1": "thanks", "answer2": "no"}, "annotations": [
            {"completed_by": 3, "lead_time": 2.5, "created_at": "2024-05-01T10:00:00.5Z",
             "result": [{"type": "pairwise", "from_name": "comparison", "to_name": ["answer1", "answer2"], "value": {"selected": "left"}}]},
            {"completed_by": {"id": 4, "email": "b@example.org"},
             "result": [{"type": "pairwise", "from_name": "comparison", "to_name": ["answer1", "answer2"], "value": {"selected": "right"}},
                        {"type": "textarea", "from_name": "comment", "to_name": "prompt", "value": {"text": ["hmm"]}}]},
            {"completed_by": 5, "result": [{"type": "choices", "from_name": "verdict", "to_name": "prompt", "value": {"choices": ["Both bad"]}}]},
            {"completed_by": 6, "was_cancelled": True, "result": []},
            {"completed_by": 8, "result": []},
        ]},
    ]
    path = tmp_path / "project.json"
    path.write_text(json.dumps(tasks))
    assert import_judgements(store, path, queue="ls") == {"items_created": 1, "annotators_created": 3, "judgements_created": 3,
                                                          "duplicates_skipped": 0, "empty_skipped": 2}
    rows = store.judgements("ls")
    assert [(r["annotator"], r["choice"], r["comment"], r["ms"]) for r in rows] == [
        ("label-studio-user-3", "A", None, 2500), ("b@example.org", "B", "hmm", None), ("label-studio-user-5", "both_bad", None, None)]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Which is kinder?"}]
    assert rows[0]["created_at"] == "2024-05-01T10:00:00.500000+00:00"


@pytest.mark.parametrize(("content", "where", "says"), [
    ('{"queue": "q", "prompt": [{"role": "user", "content": "x"}], "response_a": "a", "response_b": "b", '
     '"choice": "A", "annotator": "ann"}\n\n{"queue": "q", "prompt": [{"role": "user", "content": "y"}], '
     '"response_a": "a", "response_b": "b", "choice": "left", "annotator": "ann"}\n', "line 3", "choice 'left'"),
    ('{"queue": "q"\n', "line 1", "not JSON"),
    ('{"queue": "q", "prompt": "x", "response_a": "a", "response_b": "b", "choice": "A", "annotator": "ann"}\n', "line 1", "prompt"),
    ('{"queue": "q", "prompt": [{"role": "user", "content": "x"}], "response_b": "b", "choice": "A", "annotator": "ann"}\n',
     "line 1", "missing response_a"),
    ('{"queue": "q", "prompt": [{"role": "user", "content": "x"}], "response_a": "a", "response_b": "b", "choice": "A", '
     '"annotator": "ann", "created_at": "yesterday"}\n', "line 1", "created_at"),
    ('{"queue": "q", "prompt": [{"role": "user", "content": "x"}], "response_a": "a", "response_b": "b", "choice": "A", '
     '"annotator": "ann", "colour": "red"}\n', "line 1", "unknown key colour"),
])
def test_a_bad_jsonl_row_names_its_line_and_nothing_is_imported(store, tmp_path, content, where, says):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=re.escape(f"{path}: {where}") + ".*" + re.escape(says)):
        import_judgements(store, path)
    assert store.count_judgements("q") == 0 and store.stats("q")["queue"]["items"] == 0


def test_a_bad_label_studio_task_names_it(store, tmp_path):
    good = {"data": {"prompt": "p", "answer1": "a", "answer2": "b"}, "annotations": [
        {"completed_by": 1, "result": [{"type": "pairwise", "value": {"selected": "left"}}]}]}
    bad = {"id": 9, "data": {"prompt": "p", "answer1": "a", "answer2": "b"}, "annotations": [
        {"completed_by": 1, "result": [{"type": "pairwise", "value": {"selected": "left"}},
                                       {"type": "choices", "value": {"choices": ["tie"]}}]}]}
    path = tmp_path / "project.json"
    path.write_text(json.dumps([good, bad]))
    with pytest.raises(InputError, match=re.escape(f"{path}: task 2 (id 9), annotation 1: more than one verdict")):
        import_judgements(store, path, queue="ls")
    assert store.count_judgements("ls") == 0


# ------------------------------------------------------------ no database


def test_kappa_against_textbook_examples():
    # Cohen: 50 proposals read by two readers, Yes/Yes 20, Yes/No 5, No/Yes 10, No/No 15 (Wikipedia, "Cohen's kappa"): 0.4
    a = ["Y"] * 25 + ["N"] * 25
    b = ["Y"] * 20 + ["N"] * 5 + ["Y"] * 10 + ["N"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["A", "A"], ["A", "A"]) is None and cohen_kappa([], []) is None
    # Fleiss: 10 subjects, 14 raters, 5 categories (Wikipedia, "Fleiss' kappa"): P = 0.378, Pe = 0.213, kappa = 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    ratings = [[category for category, n in enumerate(row) for _ in range(n)] for row in table]
    assert fleiss_kappa(ratings) == pytest.approx(0.20993, abs=1e-5)
    # with two raters on every item, Fleiss' kappa is Scott's pi: (p_o - p_e) / (1 - p_e) with pooled shares
    pi = (0.7 - (0.45**2 + 0.55**2)) / (1 - (0.45**2 + 0.55**2))
    assert fleiss_kappa([list(pair) for pair in zip(a, b)]) == pytest.approx(pi)
    # unequal counts: items weigh alike, each with its own number of raters
    assert fleiss_kappa([["A", "A", "A"], ["A", "B"], ["B"]]) == pytest.approx((0.5 - (0.8**2 + 0.2**2)) / (1 - 0.68))


def test_store_url_prefers_the_environment_then_the_pipeline(monkeypatch, tmp_path):
    monkeypatch.delenv("RLHF_LABELS_URL", raising=False)
    assert store_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/labels.db"
    assert store_url(tmp_path, "postgresql+psycopg://x/labels") == "postgresql+psycopg://x/labels"
    monkeypatch.setenv("RLHF_LABELS_URL", "sqlite:////elsewhere/labels.db")
    assert store_url(tmp_path, "postgresql+psycopg://x/labels") == "sqlite:////elsewhere/labels.db"


def test_sqlite_store_is_in_wal_mode_with_full_sync(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path}/labels.db")
    try:
        with store.engine.connect() as connection:
            pragmas = [connection.exec_driver_sql(f"PRAGMA {name}").scalar() for name in ("journal_mode", "synchronous", "foreign_keys")]
        assert pragmas == ["wal", 2, 1]
        assert sqlite3.connect(tmp_path / "labels.db").execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        store.close()
