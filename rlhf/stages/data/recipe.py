"""Stage 1, data preparation: instruction data, preference pairs and prompts, validated and split.

Reads each configured source, converts every row to the conversational
shapes TRL trains on (stopping at the first invalid row, or dropping and
counting invalid rows when the source says `on_invalid: drop`), drops exact
duplicates, splits by prompt, and writes parquet splits plus statistics.
"""

from __future__ import annotations

import json
import warnings

import mlflow
import pandas as pd

from rlhf.stages.data.config import DataStage
from rlhf.data import formats, prepare
from rlhf.lifecycle import StageContext, StageResult
from rlhf.store import digest_tree


def prepare_data(ctx: StageContext) -> StageResult:
    config: DataStage = ctx.config
    datasets, stats = {}, {}
    for role in formats.CONVERTERS:
        source = getattr(config, role)
        if source is None:
            continue
        examples, dropped, rows_read, where = prepare.read_examples(source, role, ctx.seed)
        datasets[role] = prepare.split(examples, config.eval_fraction, ctx.seed)
        stats[role] = {"source": where, **prepare.statistics(datasets[role], dropped, rows_read)}

    datasets["prompts"] = prepare.distinct_prompts(
        {name: [e for parts in datasets.values() for e in parts[name]] for name in prepare.SPLITS}
    )
    stats.setdefault("prompts", {}).update({name: {"rows": len(rows)} for name, rows in datasets["prompts"].items()})
    gold = config.gold()

    for role, parts in datasets.items():
        prepare.write_splits(parts, ctx.outputs / role)
    (ctx.outputs / "stats.json").write_text(json.dumps(stats, indent=2))
    (ctx.outputs / "task.json").write_text(json.dumps({"gold_reward": gold}))

    for role, parts in datasets.items():
        for name, examples in parts.items():
            _log_dataset(role, name, examples, stats.get(role, {}).get("source", role), ctx)
    metrics = dict(_numbers(stats))
    mlflow.log_metrics(metrics)
    mlflow.log_dict(stats, "data/stats.json")
    role = next(role for role in ("instructions", "preferences", "prompts") if role in stats)
    return StageResult(metrics=metrics, headline=f"{role}.train.rows")



def _numbers(tree: dict, prefix: str = ""):
    """Numeric leaves of nested statistics as dotted metric names."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)):
            yield f"{prefix}{key}", float(value)


def _log_dataset(role: str, split: str, examples: list[dict], where: str, ctx: StageContext) -> None:
    """Log a split as an MLflow dataset input, named and digested like the file that holds it."""
    frame = pd.DataFrame(
        {column: [formats.text_of(e[column]) for e in examples] for column in examples[0]} if examples else {}
    )
    path = ctx.outputs / role / f"{split}.parquet"
    with warnings.catch_warnings():  # mlflow registers its local source class twice and warns about it
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=where, name=f"{role}-{split}", digest=digest_tree(path)[:16])
    mlflow.log_input(dataset, context=split)
