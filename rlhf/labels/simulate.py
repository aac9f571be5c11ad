"""Simulated annotators: they judge through the HTTP API exactly as the page does, from a gold reward with
Bradley-Terry noise, so tests, demos and the load benchmark run the human loop without people."""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from rlhf.data.formats import text_of
from rlhf.gold import Gold


class SimulationError(Exception):
    """The server answered what a browser would not expect (a bad token, a 5xx)."""


def decide(gold: Gold, item: dict, temperature: float, rng: random.Random, tie_margin: float = 0.0) -> tuple[str, bool | None]:
    """A choice of "A", "B" or "tie", and whether it goes against the gold order (None for a tie). Gold rewards
    within `tie_margin` of each other are a tie, as people call near-equal responses (the ties of Rao and
    Kupper's extension of Bradley-Terry)."""
    text = text_of(item["prompt"])
    gold_a, gold_b = gold(text, item["response_a"]), gold(text, item["response_b"])
    if gold_a == gold_b or abs(gold_a - gold_b) < tie_margin:
        return "tie", None
    margin = (gold_a - gold_b) / temperature if temperature > 0 else math.copysign(math.inf, gold_a - gold_b)
    p_a = 1 / (1 + math.exp(-max(-700.0, min(700.0, margin))))  # exp overflows past about 709
    choice = "A" if rng.random() < p_a else "B"
    return choice, (choice == "A") != (gold_a > gold_b)


@dataclass
class _Tally:
    limit: int | None
    deadline: float
    reserved: int = 0  # judgements started or acknowledged, so that `limit` is never overshot
    ids: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    conflicts: int = 0  # 409: two workers of one token judged the same item
    unanswered: int = 0  # the server was down or the connection broke: the judgement may or may not be in
    against_gold: int = 0
    ordered: int = 0
    ties: int = 0
    finished: int = 0  # workers whose annotator had nothing left to judge

    def reserve(self) -> bool:
        if time.monotonic() >= self.deadline or (self.limit is not None and self.reserved >= self.limit):
            return False
        self.reserved += 1
        return True


def simulate(base_url: str, tokens: list[str], gold: Gold, temperature: float = 0.1, seed: int = 0,
             limit: int | None = None, seconds: float | None = None, concurrency: int | None = None,
             think_ms: float = 0.0, timeout: float = 30.0, tie_margin: float = 0.0) -> dict:
    """Judge until `limit` judgements are acknowledged, `seconds` pass, or no annotator has anything left.

    Worker i judges in turn as each of tokens[i], tokens[i + concurrency], ... (with fewer tokens than
    workers, several workers share one). One worker judging as every annotator in turn is deterministic,
    for a given seed and server seed: how a pipeline simulates its people. The result holds the
    acknowledged judgement ids, so a caller can check every one of them is in the database.
    """
    if not tokens:
        raise ValueError("simulate needs at least one annotator token")
    choose = functools.partial(decide, gold, temperature=temperature, tie_margin=tie_margin)
    work = _simulate(base_url, tokens, choose, seed, limit, seconds, concurrency or len(tokens), think_ms, timeout)
    # a loop of its own in a thread of its own: callers already inside an event loop (Playwright's sync API,
    # a notebook) cannot start another in theirs
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


async def _simulate(base_url, tokens, choose, seed, limit, seconds, concurrency, think_ms, timeout) -> dict:
    started = time.monotonic()
    tally = _Tally(limit, started + seconds if seconds is not None else math.inf)
    workers = [_worker(base_url, tokens[i::concurrency] or [tokens[i % len(tokens)]], choose,
                       random.Random(f"{seed}/{i}"), think_ms, timeout, tally) for i in range(concurrency)]
    await asyncio.gather(*workers)
    elapsed = time.monotonic() - started
    return {
        "judgements": len(tally.ids),
        "ids": tally.ids,
        "seconds": elapsed,
        "per_second": len(tally.ids) / elapsed if elapsed else 0.0,
        "latency_ms": _percentiles(tally.latencies),
        "noise": tally.against_gold / tally.ordered if tally.ordered else None,
        "ties": tally.ties,
        "conflicts": tally.conflicts,
        "unanswered": tally.unanswered,
        "exhausted": tally.finished == concurrency,
        "annotators": len(set(tokens)),
        "concurrency": concurrency,
    }


async def _worker(base_url, tokens, choose, rng, think_ms, timeout, tally: _Tally) -> None:
    """Judges as each of `tokens` in turn, until none of them has anything left or the tally says stop."""
    clients = [httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {t}"}, timeout=timeout) for t in tokens]
    try:
        turn = 0
        while clients and tally.reserve():
            client = clients[turn % len(clients)]
            try:
                item = await _next(client)
            except httpx.TransportError:
                tally.reserved -= 1
                tally.unanswered += 1
                await asyncio.sleep(0.1)  # a restarting server: try again shortly, as a person would
                continue
            if item is None:  # this annotator has judged everything it may
                tally.reserved -= 1
                clients.remove(client)
                await client.aclose()
                continue
            turn += 1
            shown = time.monotonic()
            choice, against = choose(item, rng=rng)
            await asyncio.sleep(think_ms / 1000)
            ms = round((time.monotonic() - shown) * 1000)
            sent = time.monotonic()
            try:
                response = await client.post("/api/judgements", json={"item_id": item["id"], "choice": choice, "ms": ms})
            except httpx.TransportError:
                tally.reserved -= 1
                tally.unanswered += 1
                continue
            if response.status_code == 409:
                tally.reserved -= 1
                tally.conflicts += 1
                continue
            _expect(response, 201)
            tally.latencies.append(time.monotonic() - sent)
            tally.ids.append(response.json()["id"])
            if against is None:
                tally.ties += 1
            else:
                tally.ordered += 1
                tally.against_gold += against
        if not clients:
            tally.finished += 1
    finally:
        for client in clients:
            await client.aclose()


async def _next(client: httpx.AsyncClient) -> dict | None:
    response = await client.get("/api/next")
    _expect(response, 200)
    return response.json()["item"]


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise SimulationError(f"{response.request.method} {response.request.url.path}: "
                              f"{response.status_code} {response.text[:300]}")


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(seconds)

    def rank(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000

    return {"p50": rank(0.5), "p95": rank(0.95), "p99": rank(0.99), "max": ordered[-1] * 1000}
