"""Load on the labelling page: simulated annotators judging at once through the HTTP API of `rlhf label`, run as
a separate process, on SQLite and on PostgreSQL (started by `infra/local-up postgres`). Two phases each:

- steady: `--annotators` (20) judge for `--seconds` (60);
- kill -9: the same for `--kill-seconds` (30), with the server's process group killed (SIGKILL) a third of
  the way in and started again at once; the annotators retry as a browser's user would.

After each phase: lost (judgements answered 201 that are not in the database) and duplicated (an id
acknowledged twice, or an (item, annotator) stored twice) must both be 0. Prints a table. The simulated
annotators, the server and the database share this machine's cores, so the figures are a floor.

    .venv/bin/python benchmarks/label_load.py [--annotators 20] [--seconds 60] [--kill-seconds 30]
                                              [--pairs 2000] [--databases sqlite postgres] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf import synthetic_reviews  # noqa: E402
from rlhf.labels.simulate import simulate  # noqa: E402
from rlhf.labels.store import LabelStore, NewItem  # noqa: E402

QUEUE = "demo"  # `rlhf label demo` serves the queue named after the pipeline
VOTES = 3  # each pair wants three people, so annotators overlap as in a real queue
GOLD_EVERY = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the steady phase")
    parser.add_argument("--pairs", type=int, default=2000, help="pairs in the queue (each of its queries grows with it)")
    parser.add_argument("--kill-seconds", type=float, default=30.0, help="length of the phase with a kill -9")
    parser.add_argument("--databases", nargs="+", choices=("sqlite", "postgres"), default=["sqlite", "postgres"])
    parser.add_argument("--work", type=Path, default=None, help="scratch directory [default: a new one under /tmp]")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rlhf-label-load-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # PostgreSQL runs as user postgres when started by root, and must reach its directory
    rows = []
    try:
        for database in args.databases:
            with _database(database, work / database) as url:
                rows += _bench(database, url, work / database / "home", args)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nCPU: {_cpu()}, {os.cpu_count()} cores, shared with the simulated annotators (and other work): figures are a floor")
    print(f"{args.annotators} annotators, {args.pairs} pairs x {VOTES} votes, {args.pairs // GOLD_EVERY} gold checks, gold rate 0.1\n")
    _table(rows)
    failed = [row for row in rows if row["lost"] or row["duplicated"]]
    sys.exit(1 if failed else 0)


class _database:
    """A fresh label store: an SQLite file, or PostgreSQL from infra/local-up on a free port."""

    def __init__(self, kind: str, directory: Path):
        self.kind, self.directory = kind, directory

    def __enter__(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o755)
        if self.kind == "sqlite":
            return f"sqlite:///{self.directory / 'home' / 'labels.db'}"
        self.env = os.environ | {"RLHF_POSTGRES_PORT": str(_free_port())}
        up = subprocess.run([ROOT / "infra" / "local-up", "postgres", "--dir", self.directory / "infra"],
                            capture_output=True, text=True, env=self.env, timeout=600)
        if up.returncode:
            raise SystemExit(f"infra/local-up postgres failed:\n{up.stderr[-3000:]}")
        return dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.M))["RLHF_LABELS_URL"]

    def __exit__(self, *exc) -> None:
        if self.kind == "postgres":
            subprocess.run([ROOT / "infra" / "local-down", "postgres", "--dir", self.directory / "infra"],
                           capture_output=True, env=self.env, timeout=300)


def _bench(database: str, url: str, home: Path, args) -> list[dict]:
    store = LabelStore(url)
    store.add_items(QUEUE, "load", _pairs(args.pairs))
    tokens = [store.add_annotator(f"load-{n}") for n in range(1, args.annotators + 1)]
    store.close()
    server = _Server(home, url)
    try:
        steady = simulate(server.base, tokens, synthetic_reviews.gold_reward, temperature=0.3, seed=0, seconds=args.seconds)
        rows = [_row(database, "steady", steady, url)]
        killed = _with_a_kill(server, tokens, args.kill_seconds)
        rows.append(_row(database, "kill -9", killed, url))
    finally:
        server.stop()
    return rows


def _with_a_kill(server: _Server, tokens: list[str], seconds: float) -> dict:
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(
        simulate(server.base, tokens, synthetic_reviews.gold_reward, temperature=0.3, seed=1, seconds=seconds)))
    load.start()
    time.sleep(seconds / 3)
    killed = time.monotonic()
    server.kill()
    server.start()
    downtime = time.monotonic() - killed
    load.join()
    return result | {"downtime": downtime}


class _Server:
    """`rlhf label demo` in a process group of its own, so that kill -9 takes everything it started."""

    def __init__(self, home: Path, url: str):
        self.home, self.port = home, _free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "RLHF_LABELS_URL"} | {"RLHF_LABELS_URL": url}
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(home.parent / "server.log", "a")
        self.start()

    def start(self) -> None:
        command = [sys.executable, "-m", "flows", "--home", str(self.home), "label", QUEUE, "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise SystemExit(f"rlhf label exited with {self.process.returncode}; see {self.log.name}")
            time.sleep(0.05)
        raise SystemExit(f"rlhf label did not answer in 120 s; see {self.log.name}")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        self.log.close()


def _row(database: str, phase: str, result: dict, url: str) -> dict:
    engine = create_engine(url)
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT id, item_id, annotator_id FROM judgements")).all()
    engine.dispose()
    ids = {row.id for row in stored}
    acknowledged = result["ids"]
    return {
        "database": database, "phase": phase, "judgements": len(acknowledged), "per_second": result["per_second"],
        "p50": result["latency_ms"]["p50"], "p95": result["latency_ms"]["p95"], "unanswered": result["unanswered"],
        "conflicts": result["conflicts"], "downtime": result.get("downtime"),
        "lost": sum(1 for i in acknowledged if i not in ids),
        "duplicated": (len(acknowledged) - len(set(acknowledged))) + (len(stored) - len({(r.item_id, r.annotator_id) for r in stored})),
    }


def _pairs(count: int) -> list[NewItem]:
    rng = random.Random(0)
    pairs = []
    for n in range(count):
        product = rng.choice(synthetic_reviews.ITEMS)
        prompt = rng.choice(synthetic_reviews.PROMPT_TEMPLATES).format(item=product)
        a, b = (synthetic_reviews.write_review(rng, product, mood) for mood in rng.sample(["positive", "negative", "neutral"], 2))
        gold = None
        if n % GOLD_EVERY == 0:
            gold = "A" if synthetic_reviews.gold_reward(prompt, a) > synthetic_reviews.gold_reward(prompt, b) else "B"
        pairs.append(NewItem([{"role": "user", "content": prompt}], a, b, {"name": "sft"}, {"name": "sft"},
                             gold_choice=gold, votes=VOTES))
    return pairs


def _table(rows: list[dict]) -> None:
    header = ("database", "phase", "judgements", "per s", "p50 ms", "p95 ms", "409s", "unanswered", "down s", "lost", "duplicated")
    lines = [header] + [(
        r["database"], r["phase"], str(r["judgements"]), f"{r['per_second']:.1f}", _num(r["p50"]), _num(r["p95"]),
        str(r["conflicts"]), str(r["unanswered"]), "-" if r["downtime"] is None else f"{r['downtime']:.1f}",
        str(r["lost"]), str(r["duplicated"]),
    ) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print("  ".join(cell.rjust(width) if i > 1 else cell.ljust(width) for i, (cell, width) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * width for width in widths))


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu() -> str:
    found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return found.group(1).strip() if found else "unknown CPU"


if __name__ == "__main__":
    main()
