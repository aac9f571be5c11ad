"""Stage 3, the reward model: TRL's RewardTrainer on preference pairs, a scalar head on the SFT backbone.

Pairs come from the data stage (real preference data), from people's
judgements in the label store, or, for a task with a gold reward, are sampled
from the starting policy (the SFT model, else the stage's own model): two
responses per prompt, ordered by gold, near-ties dropped. Pair accuracy is
measured on held-out pairs before and after training; on judged pairs of a
task with a gold reward, also against gold's order of them (`eval_accuracy_gold`). Training runs here or on Ray Train (`rlhf/trl_fit.py`). The model
is saved with the tokenizer it scores with.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import mlflow
from trl import RewardConfig, RewardTrainer

from rlhf import generation, models, pairs, precision, trainer_args, training, trl_fit
from rlhf.stages.reward.config import LabelPairs, PolicyPairs, RewardStage
from rlhf.data.formats import text_of
from rlhf.data.prepare import load_splits, write_splits
from rlhf.errors import InputError
from rlhf.seeding import seed_everything
from rlhf.lifecycle import StageContext, StageResult


def train_reward(ctx: StageContext) -> StageResult:
    config: RewardStage = precision.for_stage(ctx)
    sampled = isinstance(config.pairs, PolicyPairs)
    chosen = pairs.driver_precision(config.precision, ctx.stage, "sampling and scoring pairs" if sampled else "scoring pairs")
    data_dir = ctx.input("data")
    if config.model is None:
        base = ctx.input("policy") / "model"
    else:
        base = models.provision(config.model, _texts(data_dir), ctx.seed, f"stages.{ctx.stage}.model", ctx.work / "base", ctx.home)

    pair_dir = ctx.work / "pairs"  # made once per attempt, so a resumed attempt trains on the same pairs
    if not (pair_dir / "eval.parquet").exists():
        _make_pairs(config, ctx, ctx.input("policy") / "model" if ctx.input("policy") is not None else base, chosen)
    data = load_splits(pair_dir)
    held_out = training.eval_subset(data["eval"], config.eval_rows, ctx.seed)

    seed_everything(ctx.seed)  # the head the trainer starts from
    model, tokenizer = models.new_reward_model(base, precision.dtype(chosen))
    accuracy_before, _ = _pair_accuracy(precision.attention(model, chosen, pairs.CPU), tokenizer, held_out, config.max_length)
    fitted = trl_fit.fit(
        partial(make_trainer, config.model_dump(mode="json"), ctx.seed, base, pair_dir, ctx.pipeline.ray.num_workers),
        ctx.pipeline.ray, name=f"reward-{ctx.fingerprint}", work=ctx.work, outputs=ctx.outputs, seed=ctx.seed,
        mlflow_uri=mlflow.get_tracking_uri(), mlflow_run_id=ctx.run_id,
    )
    tokenizer = models.load_tokenizer(ctx.outputs / "model")
    reward_model = precision.frozen(models.load_reward_model, ctx.outputs / "model", chosen, pairs.CPU)
    accuracy, scored = _pair_accuracy(reward_model, tokenizer, held_out, config.max_length)
    write_splits({split: list(data[split]) for split in data}, ctx.outputs / "pairs")
    judged = _judged_counts(pair_dir)
    if judged and ctx.gold() is not None:
        judged["eval_accuracy_gold"] = _gold_accuracy(scored, ctx.gold(), PolicyPairs.model_fields["min_gold_gap"].default)

    metrics = {
        "eval_accuracy": accuracy,
        "eval_accuracy_before": accuracy_before,
        "train_loss": fitted.train_loss,
        "train_steps": float(fitted.steps),
        "train_pairs": float(len(data["train"])),
        "eval_pairs": float(len(held_out)),
        "resumed_from_step": float(fitted.resumed_from_step),
        "peak_rss_mb": fitted.peak_rss_mb,
        "train_tokens_per_second": fitted.tokens_per_second,
        **judged,
    }
    mlflow.log_metrics({f"reward.{k}": v for k, v in metrics.items()})
    mlflow.log_table(scored, artifact_file="reward/held_out_pairs.json")
    return StageResult(metrics=metrics, headline="eval_accuracy")


def make_trainer(config: dict, seed: int, base: Path, pair_dir: Path, workers: int, output_dir: Path):
    """TRL's RewardTrainer with the tokenizer it pads with, from plain values (Ray workers build it too)."""
    config = RewardStage.model_validate(config)
    data = load_splits(pair_dir)
    model, tokenizer = models.new_reward_model(base)
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**trainer_args.trainer_arguments(config, seed, output_dir, workers, len(data["train"]))),
        train_dataset=data["train"],
        eval_dataset=training.eval_subset(data["eval"], config.eval_rows, seed),
        processing_class=tokenizer,
        peft_config=training.peft_config(config.lora, "SEQ_CLS", modules_to_save=["score"]),
    )
    return trainer, tokenizer



def _texts(data_dir: Path):
    """What a scratch tokenizer is trained on: the preference pairs, read only if needed."""
    for row in load_splits(data_dir / "preferences")["train"]:
        yield text_of(row["prompt"]) + "\n" + text_of(row["chosen"])


def _make_pairs(config: RewardStage, ctx: StageContext, policy_dir: Path, chosen: str) -> None:
    data_dir = ctx.input("data")
    if isinstance(config.pairs, LabelPairs):
        held_out = list(load_splits(data_dir / "prompts")["eval"]["prompt"])
        made, counts = pairs.judged_pairs(ctx.site.store(), ctx.site.queue, config.pairs.min_gold_accuracy, held_out)
        if not made["eval"]:
            raise InputError(f"stages.{ctx.stage}.pairs: none of the {len(made['train'])} judged pairs of queue "
                             f"{ctx.site.queue!r} is on a held-out prompt, so none can measure the reward model")
        write_splits(made, ctx.work / "pairs")
        (ctx.work / "pairs" / _COUNTS).write_text(json.dumps(counts))
        return
    if not isinstance(config.pairs, PolicyPairs):
        if not (data_dir / "preferences").exists():
            raise InputError(f"stages.{ctx.stage}.pairs.source: 'data' needs stages.data.preferences")
        preferences = load_splits(data_dir / "preferences")
        write_splits({split: list(preferences[split]) for split in preferences}, ctx.work / "pairs")
        return
    made = pairs.policy_pairs(
        policy_dir, load_splits(data_dir / "prompts"), {"train": config.pairs.count, "eval": config.pairs.eval_count},
        pairs.gold_scorer(ctx.gold()), config.pairs.min_gold_gap, config.pairs, ctx.seed, chosen,
    )
    write_splits(made, ctx.work / "pairs")


_COUNTS = "judged.json"


def _judged_counts(pair_dir: Path) -> dict[str, float]:
    """What people's judgements gave (pairs, ties, both bad, no majority, annotators left out), as metrics."""
    counts = pair_dir / _COUNTS
    return {f"judged.{k}": float(v) for k, v in json.loads(counts.read_text()).items()} if counts.exists() else {}


def _gold_accuracy(scored: dict, gold, min_gap: float) -> float:
    """How often the reward model orders held-out judged pairs as gold does, near-ties of gold left out: the figure
    a gold-labelled reward stage reports, for pairs people judged with noise."""
    right = [
        (c > r) == (gold(p, cr) > gold(p, rr))
        for p, cr, rr, c, r in zip(scored["prompt"], scored["chosen"], scored["rejected"], scored["chosen_score"], scored["rejected_score"])
        if abs(gold(p, cr) - gold(p, rr)) >= min_gap
    ]
    return sum(right) / len(right) if right else float("nan")


def _pair_accuracy(model, tokenizer, held_out, max_length: int) -> tuple[float, dict]:
    prompts = list(held_out["prompt"])
    chosen = generation.score(model, tokenizer, prompts, [text_of(c) for c in held_out["chosen"]], max_length)
    rejected = generation.score(model, tokenizer, prompts, [text_of(r) for r in held_out["rejected"]], max_length)
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    table = {
        "prompt": [text_of(p) for p in prompts],
        "chosen": [text_of(c) for c in held_out["chosen"]],
        "rejected": [text_of(r) for r in held_out["rejected"]],
        "chosen_score": chosen,
        "rejected_score": rejected,
    }
    return accuracy, table
