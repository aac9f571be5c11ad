"""The label store's hot calls, one at a time, as the queue grows: what the labelling page asks of the
database per judgement (`next_item` and `progress` on each GET, `judge` and `progress` on each POST).

For each size, a queue of that many pairs (3 votes each, a gold check every 20), half of them already
judged to completion by 10 annotators (imported in one transaction), then `--rounds` rounds of
next_item, judge, progress, the annotators taking turns. Prints the median and 90th percentile of
each call in milliseconds: the database work alone, no server, no HTTP.

With `--baseline REV`, the store of git revision REV is measured too, size by size in turn with this
checkout's (the machine may be busy: ratios from one run are what compare), and the ratios printed.

    .venv/bin/python benchmarks/label_queries.py [--sizes 1500 6000 24000] [--rounds 300] [--baseline REV]
                                                 [--url URL] [--baseline-url URL] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf.labels.store import LabelStore, NewItem, Record  # noqa: E402

VOTES = 3
GOLD_EVERY = 20
ANNOTATORS = 10
CALLS = ("next_item", "progress", "judge")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1500, 6000, 24000], help="pairs in the queue")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--baseline", metavar="REV", help="also measure this git revision's store, e.g. HEAD~1")
    parser.add_argument("--url", help="the store to fill [default: a new SQLite file]; each size is a queue of its own")
    parser.add_argument("--baseline-url", help="the baseline's store [default: a new SQLite file]")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory [default: a new one under /tmp]")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one size's times, for the baseline's run
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="rlhf-label-queries-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        url = args.url or f"sqlite:///{work / 'current' / 'labels.db'}"
        if args.json:
            print(json.dumps(_bench(url, args.sizes[0], args.rounds)))
            return
        baseline = _checkout(args.baseline, work / "baseline") if args.baseline else None
        baseline_url = args.baseline_url or f"sqlite:///{work / 'baseline' / 'labels.db'}"
        print(f"CPU: {_cpu()}; {VOTES} votes per pair, half the queue judged; ms per call, median / p90")
        header = f"{'pairs':>7}  {'code':<10}" + "".join(f"  {call:>15}" for call in CALLS)
        print(header + ("  " + "  ".join(f"{call + ' x':>11}" for call in CALLS) if baseline else ""))
        for size in args.sizes:
            now = _bench(url, size, args.rounds)
            print(f"{size:>7}  {'this':<10}" + "".join(f"  {_ms(now[call]):>15}" for call in CALLS), flush=True)
            if baseline:
                then = json.loads(subprocess.run(
                    [sys.executable, baseline / "benchmarks" / Path(__file__).name, "--json", "--sizes", str(size),
                     "--rounds", str(args.rounds), "--url", baseline_url],
                    check=True, capture_output=True, text=True).stdout)
                ratios = "  ".join(f"{statistics.median(then[call]) / statistics.median(now[call]):>11.1f}" for call in CALLS)
                print(f"{size:>7}  {args.baseline[:10]:<10}" + "".join(f"  {_ms(then[call]):>15}" for call in CALLS)
                      + f"  {ratios}", flush=True)
        if baseline:
            print("x: the baseline's median over this checkout's")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _bench(url: str, size: int, rounds: int) -> dict[str, list[float]]:
    queue = f"bench-{size}"
    store = LabelStore(url)
    try:
        items = [_pair(i) for i in range(size)]
        store.add_items(queue, "b1", items)
        people = [store.authenticate(store.add_annotator(f"{queue} annotator {n}")).id for n in range(ANNOTATORS)]
        store.import_records([
            Record(queue, item.prompt, item.response_a, item.response_b, "A", f"{queue} annotator {(i + k) % ANNOTATORS}")
            for i, item in enumerate(items[: size // 2]) for k in range(VOTES if item.gold_choice is None else 1)
        ])
        rng = random.Random(0)
        times: dict[str, list[float]] = {call: [] for call in CALLS}
        for n in range(rounds):
            who = people[n % ANNOTATORS]
            item = _timed(times["next_item"], store.next_item, who, queue, rng=rng)
            _timed(times["judge"], store.judge, who, item.id, rng.choice("AB"))
            _timed(times["progress"], store.progress, who, queue)
        return times
    finally:
        store.close()


def _checkout(revision: str, directory: Path) -> Path:
    """The revision's rlhf/ and this script, in `directory`."""
    (directory / "benchmarks").mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "rlhf"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    shutil.copy(__file__, directory / "benchmarks")
    return directory


def _pair(i: int) -> NewItem:
    gold = "A" if i % GOLD_EVERY == GOLD_EVERY - 1 else None
    return NewItem([{"role": "user", "content": f"prompt {i}"}], f"response {i} a", f"response {i} b",
                   {"stage": "sft"}, {"stage": "ppo"}, gold_choice=gold, votes=VOTES)


def _timed(into: list[float], call, *args, **kwargs):
    start = time.perf_counter()
    result = call(*args, **kwargs)
    into.append(time.perf_counter() - start)
    return result


def _ms(seconds: list[float]) -> str:
    return f"{1000 * statistics.median(seconds):.2f} / {1000 * statistics.quantiles(seconds, n=10)[-1]:.2f}"


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
