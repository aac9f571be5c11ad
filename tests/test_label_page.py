"""The labelling page in a real browser (Debian's chromium driven by Playwright): keys and buttons, skip, undo,
the comment and the time to decide, left/right mapped back to the stored A/B, /stats following along, and
model text that tries to run script shown as text."""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

from rlhf.labels.server import serving
from rlhf.labels.simulate import simulate
from rlhf.labels.store import LabelStore, NewItem
from rlhf.synthetic_reviews import gold_reward
from test_label_api import QUEUE, reviews

CHROMIUM = Path("/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[1] / "docs"

HOSTILE = NewItem(
    [{"role": "user", "content": "Reply with <b>markup</b>"}],
    "<script>window.pwned = 'script'; alert(1)</script>",
    "<img src=x onerror=\"window.pwned = 'img'; alert(2)\">",
    {}, {},
)
MORE = [replace(item, votes=3) for item in reviews(12, seed=3)]
PAIRS = {(item.response_a, item.response_b) for item in [HOSTILE, *MORE]}
# Math.random decides which response goes left: alternate it, so both mappings are exercised every run
ALTERNATING = "(() => { let n = 0; Math.random = () => (n++ % 2 ? 0.9 : 0.1); })();"
# (how, what): a key press, or a click on the button of that choice; left/right are sides, tie/both_bad are kept as is
ACTIONS = [("key", "1"), ("key", "2"), ("key", "3"), ("key", "0"), ("click", "left"), ("click", "right"), ("click", "tie"),
           ("click", "both_bad"), ("key", "1"), ("key", "2")]
KEY_SIDES = {"1": "left", "2": "right", "3": "tie", "0": "both_bad"}


def test_judging_in_a_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    # 5 s, Playwright's default, is too short where other work shares a 2-core machine (a CI run failed on it)
    expect.set_options(timeout=30_000)
    database = tmp_path / "labels.db"
    store = LabelStore(f"sqlite:///{database}")
    store.add_items(QUEUE, "hostile", [HOSTILE])  # alone at first, so that it is the pair the page opens with
    token = store.add_annotator("olga", owner=True)
    assert len(PAIRS) == len(MORE) + 1
    dialogs, problems = [], []
    with serving(store, QUEUE, gold_rate=0.0, seed=0) as base, sync_playwright() as playwright:
        assert CHROMIUM.exists(), "the browser test needs Debian's chromium: apt-get install chromium (.ci/run installs it)"
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        context = browser.new_context(viewport={"width": 1000, "height": 700})
        context.add_init_script(ALTERNATING)
        page, stats = context.new_page(), context.new_page()
        for tab in (page, stats):
            tab.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            tab.on("console", lambda message: message.type == "error" and problems.append(message.text))
            tab.on("pageerror", lambda error: problems.append(str(error)))
        stats.goto(f"{base}/stats?token={token}")
        expect(stats.locator("#queue td").last).to_have_text("0")

        page.goto(f"{base}/?token={token}")
        expect(page.locator("#progress")).to_have_text("judged 0 · 1 to go")
        shown = {page.locator("#left").text_content(), page.locator("#right").text_content()}
        assert shown == {HOSTILE.response_a, HOSTILE.response_b}  # the markup as text, character for character
        assert page.locator("#prompt").text_content() == "userReply with <b>markup</b>"
        assert page.locator("main img, main b, main script").count() == 0
        assert page.evaluate("window.pwned") is None and dialogs == []

        store.add_items(QUEUE, "reviews", MORE)
        expected: dict[tuple[str, str], str] = {}  # (response_a, response_b) -> the stored choice
        skipped, orders = None, set()
        for n, (how, what) in enumerate(ACTIONS, start=1):
            if n == 6:  # skip one pair: it must not come back while others are left
                skipped = _pair(page)
                page.keyboard.press("s")
                expect(page.locator("#left")).not_to_have_text(page.locator("#left").text_content())
                assert _pair(page) != skipped
                expect(page.locator("#progress")).to_contain_text(f"judged {n - 1} ")
            if n == 5:
                page.fill("#comment", "left <i>reads</i> better")
                page.screenshot(path=str(tmp_path / "label-page.png"))
            if n == 9:
                page.wait_for_timeout(400)  # the time to decide is measured from display
            pair = _pair(page)
            side = KEY_SIDES[what] if how == "key" else what
            expected[pair] = _stored(page, pair, side)
            orders.add(page.locator("#left").text_content() == pair[0])
            if how == "key":
                page.keyboard.press(what)
            else:
                page.click(f"button[data-choice={what}]")
            expect(page.locator("#progress")).to_contain_text(f"judged {n} ")
        last = pair
        page.keyboard.press("u")
        expect(page.locator("#progress")).to_contain_text("judged 9 ")
        assert _pair(page) == last
        assert _count(database) == 9
        expected[last] = _stored(page, last, "right")
        page.click("button[data-choice=right]")
        expect(page.locator("#progress")).to_contain_text("judged 10 ")

        stats.reload()
        expect(stats.locator("#queue td").last).to_have_text("10")
        expect(stats.locator("#annotators")).to_contain_text("olga")
        # two simulated colleagues judge the same pairs, so that agreement has something to measure
        simulate(base, [store.add_annotator(f"sim-{n}") for n in (1, 2)], gold_reward, temperature=0.3, seed=0, limit=16)
        stats.reload()
        expect(stats.locator("#queue td").last).to_have_text("26")
        expect(stats.locator("#pairs")).to_contain_text("sim-2")
        stats.screenshot(path=str(tmp_path / "label-stats.png"))
        browser.close()
    store.close()

    with sqlite3.connect(database) as connection:
        stored = {(a, b): (choice, comment, ms) for a, b, choice, comment, ms in connection.execute(
            "SELECT response_a, response_b, choice, comment, ms FROM judgements JOIN items ON items.id = item_id "
            "JOIN annotators ON annotators.id = annotator_id WHERE name = 'olga'")}
    assert {pair: row[0] for pair, row in stored.items()} == expected
    assert skipped not in stored
    assert [row[1] for row in stored.values() if row[1]] == ["left <i>reads</i> better"]
    assert all(row[2] is not None and 0 <= row[2] < 60_000 for row in stored.values())
    assert max(row[2] for row in stored.values()) >= 400
    assert {"A", "B", "tie", "both_bad"} <= {row[0] for row in stored.values()}
    assert orders == {True, False}  # A shown on the left for some pairs, on the right for others
    assert dialogs == [] and problems == []
    if os.environ.get("RLHF_SAVE_SCREENSHOTS"):  # docs/ keeps the committed ones; a plain test run leaves them alone
        for name in ("label-page.png", "label-stats.png"):
            shutil.copy(tmp_path / name, DOCS / name)


def _pair(page) -> tuple[str, str]:
    """The shown pair as stored, (response_a, response_b), whichever side each is on."""
    left, right = page.locator("#left").text_content(), page.locator("#right").text_content()
    return (left, right) if (left, right) in PAIRS else (right, left)


def _stored(page, pair: tuple[str, str], side: str) -> str:
    if side not in ("left", "right"):
        return side
    shown = page.locator(f"#{side}").text_content()
    return "A" if shown == pair[0] else "B"


def _count(database: Path) -> int:
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
