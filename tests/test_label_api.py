"""The labelling page's HTTP API through a real uvicorn server on SQLite: every malformed request is a 4xx with
a message and writes nothing, simulated annotators' judgements all land once, model text comes back escaped,
and a judgement answered 201 survives kill -9 of `rlhf label`."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rlhf import synthetic_reviews
from rlhf.labels.server import serving
from rlhf.labels.simulate import decide, simulate
from rlhf.labels.store import LabelStore, NewItem

QUEUE = "demo"
SCRIPT = "<script>alert(1)</script>"
HOSTILE = NewItem([{"role": "user", "content": "Say <b>hi</b>"}], f"Hi {SCRIPT}", "<b>bold</b> <img src=x onerror=alert(2)>", {}, {})


def reviews(count: int, seed: int = 0, gold_every: int = 0) -> list[NewItem]:
    rng = random.Random(seed)
    items = []
    for n in range(count):
        product = rng.choice(synthetic_reviews.ITEMS)
        a, b = (synthetic_reviews.write_review(rng, product, mood) for mood in rng.sample(["positive", "negative", "neutral"], 2))
        gold = "A" if gold_every and n % gold_every == 0 else None
        items.append(NewItem([{"role": "user", "content": f"Review the {product}."}], a, b, {"name": "sft"}, {"name": "sft"},
                             gold_choice=gold))
    return items


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    database = tmp_path_factory.mktemp("labels") / "labels.db"
    store = LabelStore(f"sqlite:///{database}")
    store.add_items(QUEUE, "hostile", [HOSTILE])
    store.add_items(QUEUE, "reviews", reviews(40, gold_every=5))
    tokens = {name: store.add_annotator(name, owner=name == "olga") for name in ("olga", "pat", "<i>eve</i>")}
    with serving(store, QUEUE, seed=0) as base:
        with httpx.Client(base_url=base, timeout=30) as client:
            first = client.get("/api/next", headers=_bearer(tokens["pat"])).json()["item"]
            judged = client.post("/api/judgements", json={"item_id": first["id"], "choice": "A"}, headers=_bearer(tokens["pat"]))
            assert judged.status_code == 201, judged.text
            yield {"client": client, "tokens": tokens, "database": database, "judged": first["id"], "store": store}
    store.close()


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def rows(database: Path) -> dict:
    """Everything a request could write."""
    with sqlite3.connect(database) as connection:
        return {table: connection.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
                for table in ("judgements", "annotators", "items", "batches")}


def _chunks(size: int):
    for _ in range(size // 1024):
        yield b" " * 1024


JSON = {"Content-Type": "application/json"}
MALFORMED = [
    # (name, method, path, who, body, extra headers, status)
    ("unknown item", "POST", "/api/judgements", "pat", {"item_id": 10**9, "choice": "A"}, {}, 404),
    ("unknown token", "GET", "/api/next", "nobody", None, {}, 401),
    ("missing token", "POST", "/api/judgements", None, {"item_id": "JUDGED", "choice": "A"}, {}, 401),
    ("not a bearer token", "GET", "/api/next", None, None, {"Authorization": "Basic cGF0OnB3"}, 401),
    ("second judgement", "POST", "/api/judgements", "pat", {"item_id": "JUDGED", "choice": "B"}, {}, 409),
    ("oversized comment", "POST", "/api/judgements", "olga", {"item_id": "JUDGED", "choice": "A", "comment": "x" * 2001}, {}, 422),
    ("comment not text", "POST", "/api/judgements", "olga", {"item_id": "JUDGED", "choice": "A", "comment": 5}, {}, 422),
    ("not JSON", "POST", "/api/judgements", "olga", b'{"item_id": 1, "choice": ', JSON, 400),
    ("not UTF-8", "POST", "/api/judgements", "olga", b'{"item_id": 1, "choice": "\xff"}', JSON, 400),
    ("JSON not an object", "POST", "/api/judgements", "olga", b'[1, "A"]', JSON, 422),
    ("form, not JSON", "POST", "/api/judgements", "olga", b"item_id=1&choice=A", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("wrong method on judgements", "PUT", "/api/judgements", "olga", {"item_id": "JUDGED", "choice": "A"}, {}, 405),
    ("wrong method on next", "POST", "/api/next", "olga", None, {}, 405),
    ("wrong method on undo", "DELETE", "/api/undo", "pat", None, {}, 405),
    ("body too large", "POST", "/api/judgements", "olga", b'{"comment": "' + b"x" * 17000 + b'"}', JSON, 413),
    ("chunked body too large", "POST", "/api/judgements", "olga", "CHUNKED", JSON, 413),
    ("bad choice", "POST", "/api/judgements", "olga", {"item_id": "JUDGED", "choice": "left"}, {}, 422),
    ("choice missing", "POST", "/api/judgements", "olga", {"item_id": "JUDGED"}, {}, 422),
    ("extra field", "POST", "/api/judgements", "olga", {"item_id": "JUDGED", "choice": "A", "annotator_id": 1}, {}, 422),
    ("negative ms", "POST", "/api/judgements", "olga", {"item_id": "JUDGED", "choice": "A", "ms": -5}, {}, 422),
    ("ms over a day", "POST", "/api/judgements", "olga", {"item_id": "JUDGED", "choice": "A", "ms": 86_400_001}, {}, 422),
    ("ms not whole", "POST", "/api/judgements", "olga", {"item_id": "JUDGED", "choice": "A", "ms": 12.5}, {}, 422),
    ("item id as text", "POST", "/api/judgements", "olga", {"item_id": "1", "choice": "A"}, {}, 422),
    ("item id a boolean", "POST", "/api/judgements", "olga", {"item_id": True, "choice": "A"}, {}, 422),
    ("item id past int64", "POST", "/api/judgements", "olga", {"item_id": 2**64, "choice": "A"}, {}, 422),
    ("bad exclude", "GET", "/api/next?exclude=1,x", "olga", None, {}, 400),
    ("negative exclude", "GET", "/api/next?exclude=-3", "olga", None, {}, 400),
    ("too many excluded", "GET", "/api/next?exclude=" + ",".join(map(str, range(1, 102))), "olga", None, {}, 400),
    ("nothing to undo", "POST", "/api/undo", "olga", None, {}, 404),
    ("non-owner on stats API", "GET", "/api/stats", "pat", None, {}, 403),
    ("non-owner on stats page", "GET", "/stats?token=PAT", None, None, {}, 403),
    ("stats page without token", "GET", "/stats", None, None, {}, 401),
    ("page with unknown token", "GET", "/?token=nobody", None, None, {}, 401),
    ("page without token", "GET", "/", None, None, {}, 401),
    ("unknown path", "GET", "/api/judgements/1", "olga", None, {}, 404),
]


@pytest.mark.parametrize("name, method, path, who, body, headers, status", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_a_malformed_request_is_refused_with_a_message_and_writes_nothing(site, name, method, path, who, body, headers, status):
    client, tokens = site["client"], site["tokens"]
    headers = dict(headers)
    if who is not None:
        headers |= _bearer(tokens.get(who, "not-a-token"))
    path = path.replace("PAT", tokens["pat"])
    if isinstance(body, dict):
        body = {key: site["judged"] if value == "JUDGED" else value for key, value in body.items()}
        request = {"json": body}
    else:
        request = {"content": _chunks(20 * 1024) if body == "CHUNKED" else body}
    before = rows(site["database"])
    response = client.request(method, path, headers=headers, **request)
    assert response.status_code == status, response.text
    if path.startswith("/api/"):
        assert response.headers["content-type"] == "application/json"
        assert len(response.json()["error"]) > 10
    else:  # a page: the message in HTML
        assert response.headers["content-type"].startswith("text/html") and re.search(r'<p id="message">[^<]{10,}</p>', response.text)
    if status == 401 and path.startswith("/api/"):
        assert response.headers["www-authenticate"] == "Bearer"
    assert rows(site["database"]) == before


def test_every_answer_carries_a_strict_content_security_policy(site):
    client, token = site["client"], site["tokens"]["olga"]
    for response in (client.get(f"/?token={token}"), client.get(f"/stats?token={token}"), client.get("/static/label.js"),
                     client.get("/api/next"), client.get("/nowhere")):
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"  # the page's address holds a token


def test_model_text_comes_back_escaped_in_the_page(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_items(QUEUE, "hostile", [HOSTILE])
    token = store.add_annotator("<i>eve</i>")
    with serving(store, QUEUE) as base:
        page = httpx.get(f"{base}/?token={token}").text
    store.close()
    assert SCRIPT not in page and "<b>bold</b>" not in page and "<img src=x" not in page and "<b>hi</b>" not in page
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in page and "\\u003cb\\u003ebold" in page
    assert "&lt;i&gt;eve&lt;/i&gt;" in page and "<i>eve</i>" not in page  # the annotator's name, too
    assert page.count("<script") == 2  # the JSON data block and label.js, nothing else


def test_the_stats_page_escapes_names_and_shows_the_numbers(site):
    client, olga = site["client"], site["tokens"]["olga"]
    item = client.get("/api/next", headers=_bearer(site["tokens"]["<i>eve</i>"])).json()["item"]
    client.post("/api/judgements", json={"item_id": item["id"], "choice": "B"}, headers=_bearer(site["tokens"]["<i>eve</i>"]))
    page = client.get(f"/stats?token={olga}")
    assert page.status_code == 200
    assert "&lt;i&gt;eve&lt;/i&gt;" in page.text and "<i>eve</i>" not in page.text
    numbers = client.get("/api/stats", headers=_bearer(olga)).json()
    eve = next(a for a in numbers["annotators"] if a["name"] == "<i>eve</i>")
    assert eve["judgements"] >= 1
    assert f"<td>{numbers['queue']['judgements']}</td>" in page.text and f"<td>{eve['judgements']}</td>" in page.text


def test_judge_then_undo_through_the_api(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_items(QUEUE, "b", reviews(3))
    token = store.add_annotator("ann")
    with serving(store, QUEUE) as base, httpx.Client(base_url=base, headers=_bearer(token)) as client:
        shown = client.get("/api/next").json()
        assert shown["progress"] == {"judged": 0, "remaining": 3}
        assert set(shown["item"]) == {"id", "prompt", "response_a", "response_b"}  # nothing says gold or purpose
        skipped = client.get(f"/api/next?exclude={shown['item']['id']}").json()["item"]
        assert skipped["id"] != shown["item"]["id"]
        answer = client.post("/api/judgements", json={"item_id": skipped["id"], "choice": "B", "comment": "<ok>", "ms": 1234})
        assert answer.status_code == 201 and answer.json()["progress"] == {"judged": 1, "remaining": 2}
        with sqlite3.connect(tmp_path / "labels.db") as connection:
            assert connection.execute("SELECT id, item_id, choice, comment, ms FROM judgements").fetchall() == [
                (answer.json()["id"], skipped["id"], "B", "<ok>", 1234)]
        undone = client.post("/api/undo").json()
        assert undone["item"]["id"] == skipped["id"] and undone["progress"]["judged"] == 0
        with sqlite3.connect(tmp_path / "labels.db") as connection:
            assert connection.execute("SELECT COUNT(*) FROM judgements").fetchone() == (0,)
    store.close()


def test_simulated_annotators_judge_through_the_api_and_every_acknowledged_judgement_is_stored_once(tmp_path):
    store = LabelStore(f"sqlite:///{tmp_path / 'labels.db'}")
    store.add_items(QUEUE, "b", reviews(60, seed=1, gold_every=6))
    tokens = [store.add_annotator(f"sim-{n}") for n in range(1, 5)]
    with serving(store, QUEUE, seed=1) as base:
        # six workers over four tokens: two pairs share an annotator, as two tabs of one person would
        result = simulate(base, tokens, synthetic_reviews.gold_reward, temperature=0.3, seed=2, limit=45, concurrency=6)
    with sqlite3.connect(tmp_path / "labels.db") as connection:
        stored = connection.execute("SELECT id, item_id, annotator_id FROM judgements").fetchall()
    assert result["judgements"] == 45 and len(set(result["ids"])) == 45
    assert sorted(result["ids"]) == sorted(row[0] for row in stored)
    assert len({(item, annotator) for _, item, annotator in stored}) == len(stored)
    assert result["latency_ms"]["p95"] > 0 and 0 <= result["noise"] < 0.5
    store.close()


@pytest.mark.parametrize("gap, temperature", [(0.5, 0.5), (0.2, 1.0), (1.0, 0.25)])
def test_the_simulated_choice_follows_bradley_terry(gap, temperature):
    item = {"prompt": [{"role": "user", "content": "p"}], "response_a": "a", "response_b": "b"}
    gold = {"a": gap, "b": 0.0}
    rng = random.Random(0)
    draws = [decide(lambda prompt, response: gold[response], item, temperature, rng) for _ in range(4000)]
    share_a = sum(choice == "A" for choice, _ in draws) / len(draws)
    expected = 1 / (1 + 2.718281828459045 ** (-gap / temperature))
    assert abs(share_a - expected) < 0.025
    assert sum(against for _, against in draws) / len(draws) == pytest.approx(1 - share_a)
    assert decide(lambda prompt, response: 0.3, item, temperature, rng) == ("tie", None)
    assert decide(lambda prompt, response: gold[response], item, 0.0, rng) == ("A", False)
    assert decide(lambda prompt, response: gold[response], item, temperature, rng, tie_margin=gap + 0.01) == ("tie", None)
    assert decide(lambda prompt, response: gold[response], item, 0.0, rng, tie_margin=gap - 0.01) == ("A", False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rlhf_label_serves_the_queue_and_a_201_survives_kill_9(tmp_path):
    home = tmp_path / "home"
    store = LabelStore(f"sqlite:///{home / 'labels.db'}")
    store.add_items(QUEUE, "b", reviews(10))
    store.close()
    env = {k: v for k, v in os.environ.items() if k != "RLHF_LABELS_URL"}
    cli = [sys.executable, "-m", "flows", "--home", str(home), "label"]
    link = subprocess.run([*cli, "add-annotator", "ann", "--owner"], capture_output=True, text=True, env=env, timeout=120)
    assert link.returncode == 0, link.stderr
    token = link.stdout.strip().rpartition("?token=")[2]
    port = _free_port()
    server = subprocess.Popen([*cli, QUEUE, "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    acknowledged = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=_bearer(token), timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    assert server.poll() is None and time.monotonic() < deadline, "rlhf label did not start"
                    time.sleep(0.2)
            for _ in range(5):
                item = client.get("/api/next").json()["item"]
                answer = client.post("/api/judgements", json={"item_id": item["id"], "choice": "tie", "ms": 10})
                assert answer.status_code == 201
                acknowledged.append(answer.json()["id"])
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    with sqlite3.connect(home / "labels.db") as connection:
        assert sorted(row[0] for row in connection.execute("SELECT id FROM judgements")) == sorted(acknowledged)
    stats = subprocess.run([*cli, "stats", QUEUE], capture_output=True, text=True, env=env, timeout=120)
    assert stats.returncode == 0, stats.stderr
    assert "10 items (0 gold checks)" in stats.stdout and "5 judgements" in stats.stdout and "│ ann " in stats.stdout


def test_rlhf_label_simulates_exports_and_imports(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from rlhf.errors import InputError

    monkeypatch.delenv("RLHF_LABELS_URL", raising=False)
    home = tmp_path / "home"
    store = LabelStore(f"sqlite:///{home / 'labels.db'}")
    store.add_items(QUEUE, "b", reviews(20, seed=4, gold_every=4))
    store.close()
    runner = CliRunner()

    def label(*args: str):
        return runner.invoke(app, ["--home", str(home), "label", *args])

    simulated = label("simulate", QUEUE, "--annotators", "2", "--judgements", "12", "--temperature", "0")
    assert simulated.exit_code == 0, simulated.output
    assert "12 judgements by 2 simulated annotators" in simulated.output and "label noise 0.000" in simulated.output
    exported = label("export", str(tmp_path / "out.jsonl"), "-p", QUEUE)
    assert "12 judgements of queue 'demo'" in exported.output
    imported = label("import", str(tmp_path / "out.jsonl"), "-p", "demo-human")
    assert "judgements created 12" in imported.output, imported.output
    with sqlite3.connect(home / "labels.db") as connection:
        assert dict(connection.execute(
            "SELECT queue, COUNT(*) FROM judgements JOIN items ON items.id = item_id GROUP BY queue")) == {"demo": 12, "demo-human": 12}
    assert "add-annotator" in label("--help").output  # the group's help, not `serve --help`
    for args, message in ((["no-such-pipeline"], "no pipeline named 'no-such-pipeline'"),
                          (["import", str(tmp_path / "missing.jsonl")], "no such file"),
                          (["export", str(tmp_path / "out.csv")], "cannot tell the format")):
        refused = label(*args)
        assert isinstance(refused.exception, InputError) and message in str(refused.exception), (args, refused.output)
