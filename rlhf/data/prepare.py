"""Clean, split and describe a data set; write and read its splits as parquet.

Parquet rather than `save_to_disk`: the same rows give the same bytes, so
the content digest of the data stage, and every fingerprint downstream of
it, stays put when the data did not change.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from rlhf import synthetic_reviews
from rlhf.blocks import SyntheticReviewsSource
from rlhf.data import sources
from rlhf.data.formats import CONVERTERS, RowProblem, text_of
from rlhf.errors import InputError

SPLITS = ("train", "eval")


def read_examples(source, role: str, seed: int) -> tuple[list[dict], Counter, int, str]:
    """A source's rows converted for its role: (examples, dropped by reason, rows read, where they came from)."""
    if isinstance(source, SyntheticReviewsSource):
        generated = synthetic_reviews.generate_examples(source.examples, source.positive_share, seed)
        rows = ((n, {"prompt": e["prompt"], "completion": e["completion"]}) for n, e in enumerate(generated, 1))
        where, on_invalid = f"synthetic_reviews(seed={seed})", "error"
    else:
        rows, where, on_invalid = sources.read_rows(source), sources.describe(source), source.on_invalid
    read = Counter()
    examples, dropped = normalize(_counted(rows, read), CONVERTERS[role], where, on_invalid)
    return examples, dropped, read["rows"], where


def _counted(rows, counter: Counter):
    for row in rows:
        counter["rows"] += 1
        yield row


def normalize(
    rows: Iterable[tuple[int, dict]], convert: Callable[[dict], dict], where: str, on_invalid: str
) -> tuple[list[dict], Counter]:
    """Convert every row; an invalid row stops here (`error`) or is counted and dropped."""
    kept, dropped = [], Counter()
    seen = set()
    for number, row in rows:
        try:
            example = convert(row)
        except RowProblem as problem:
            if on_invalid == "error":
                raise InputError(f"{where}: row {number}: {problem}") from None
            dropped[problem.reason] += 1
            continue
        key = json.dumps(example, sort_keys=True)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append(example)
    if not kept:
        raise InputError(f"{where}: no valid rows (dropped: {dict(dropped) or 'none'})")
    return kept, dropped


def split(examples: list[dict], eval_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Deterministic split by prompt, so no prompt is both trained on and held out."""

    def position(example: dict) -> float:
        text = f"{seed}:{json.dumps(example['prompt'], sort_keys=True)}"
        return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16) / 16**15

    ranked = sorted(examples, key=position)
    cut = sum(position(e) < eval_fraction for e in ranked)
    if cut == 0:  # tiny data: hold out the lowest-ranked prompt rather than nothing
        first = json.dumps(ranked[0]["prompt"], sort_keys=True)
        cut = sum(json.dumps(e["prompt"], sort_keys=True) == first for e in ranked)
    held_out = {json.dumps(e["prompt"], sort_keys=True) for e in ranked[:cut]}
    parts = {
        "train": [e for e in examples if json.dumps(e["prompt"], sort_keys=True) not in held_out],
        "eval": [e for e in examples if json.dumps(e["prompt"], sort_keys=True) in held_out],
    }
    if not parts["train"]:
        raise InputError(f"eval_fraction {eval_fraction} leaves no training rows; lower it")
    return parts


def distinct_prompts(parts: dict[str, list[dict]]) -> dict[str, list[dict]]:
    out = {}
    for name, examples in parts.items():
        seen = {}
        for example in examples:
            seen.setdefault(json.dumps(example["prompt"], sort_keys=True), {"prompt": example["prompt"]})
        out[name] = list(seen.values())
    return out


def statistics(parts: dict[str, list[dict]], dropped: Counter, rows_read: int) -> dict:
    """Counts, words-per-field percentiles and dropped rows by reason."""
    stats: dict = {"rows_read": rows_read, "dropped": dict(sorted(dropped.items()))}
    for name, examples in parts.items():
        stats[name] = {"rows": len(examples), "distinct_prompts": len(distinct_prompts({name: examples})[name])}
        for column in examples[0] if examples else ():
            words = np.array([len(text_of(e[column]).split()) for e in examples])
            stats[name][f"{column}_words"] = {
                f"p{q}": float(np.percentile(words, q)) for q in (5, 50, 95, 100)
            }
    return stats


def write_splits(parts: dict[str, list[dict]], directory: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    for name, examples in parts.items():  # each file whole or absent: a resumed stage trusts the ones it finds
        partial = directory / f".{name}.parquet.partial"
        pq.write_table(pa.Table.from_pylist(examples), partial)
        partial.rename(directory / f"{name}.parquet")


def load_splits(directory: Path):
    """The splits as a `datasets.DatasetDict`, ready for the TRL trainers."""
    import datasets

    files = {name: str(directory / f"{name}.parquet") for name in SPLITS if (directory / f"{name}.parquet").exists()}
    return datasets.load_dataset("parquet", data_files=files)
