"""Stage 4 (instead of RL), DPO: TRL's DPOTrainer on preference pairs, a LoRA policy against its reference.

The policy starts from the SFT model (or the block's `policy`); the reference
is that same model, which TRL gets by switching the adapter off. Pairs come
from the data stage (human preferences) or are sampled from the starting
policy, two per prompt, and ordered by the reward model (on-policy DPO: the
policy learns from the same signal the RL stages optimise). Training runs
here or on Ray Train (`rlhf/trl_fit.py`) and resumes from its newest
checkpoint. Outputs: `model/` (the adapter merged, with the tokenizer),
`adapter/`, `pairs/` and `mlflow_model.json`, like the RL stages.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import mlflow
from trl import DPOConfig, DPOTrainer

from rlhf import models, pairs, precision, registry, trainer_args, training, trl_fit
from rlhf.blocks import LoraAdapter
from rlhf.stages.dpo.config import DpoStage, RewardModelPairs
from rlhf.stages.reward.config import LabelPairs
from rlhf.data.prepare import load_splits, write_splits
from rlhf.lifecycle import StageContext, StageResult
from rlhf.stages import policies


def train_dpo(ctx: StageContext) -> StageResult:
    config: DpoStage = precision.for_stage(ctx)
    start = policies.starting_policy(ctx, ctx.stage)
    pair_dir = ctx.work / "pairs"  # made once per attempt, so a resumed attempt trains on the same pairs
    if not (pair_dir / "eval.parquet").exists():
        write_splits(_pairs(config, ctx, start), pair_dir)

    fitted = trl_fit.fit(
        partial(make_trainer, config.model_dump(mode="json"), ctx.seed, start, pair_dir, ctx.pipeline.ray.num_workers),
        ctx.pipeline.ray, name=f"dpo-{ctx.fingerprint}", work=ctx.work, outputs=ctx.outputs, seed=ctx.seed,
        mlflow_uri=mlflow.get_tracking_uri(), mlflow_run_id=ctx.run_id,
    )
    data = load_splits(pair_dir)
    write_splits({split: list(data[split]) for split in data}, ctx.outputs / "pairs")
    if isinstance(config.adapter, LoraAdapter):  # a prompt-learning policy is no plain transformers model to log
        policy = ctx.outputs / "model"
        model_uri = registry.log_policy(models.load_causal_lm(policy), models.load_tokenizer(policy), config.max_new_tokens)
        (ctx.outputs / "mlflow_model.json").write_text(json.dumps({"model_uri": model_uri}))

    metrics = {
        "eval_loss": fitted.eval["eval_loss"],
        "eval_reward_accuracy": fitted.eval["eval_rewards/accuracies"],  # the implicit reward's, on held-out pairs
        "eval_reward_margin": fitted.eval["eval_rewards/margins"],
        "eval_loss_first": fitted.first_eval_loss,
        "train_loss": fitted.train_loss,
        "train_steps": float(fitted.steps),
        "train_pairs": float(len(data["train"])),
        "resumed_from_step": float(fitted.resumed_from_step),
        "peak_rss_mb": fitted.peak_rss_mb,
        "train_tokens_per_second": fitted.tokens_per_second,
    }
    mlflow.log_metrics({f"dpo.{k}": v for k, v in metrics.items()})
    return StageResult(metrics=metrics, headline="eval_reward_accuracy")


def make_trainer(config: dict, seed: int, start: Path, pair_dir: Path, workers: int, output_dir: Path):
    """TRL's DPOTrainer with its tokenizer, from plain values (Ray workers build it too)."""
    config = DpoStage.model_validate(config)
    data = load_splits(pair_dir).select_columns(["prompt", "chosen", "rejected"])
    tokenizer = models.load_tokenizer(start)
    trainer = DPOTrainer(
        model=models.load_causal_lm(start),
        args=DPOConfig(**trainer_args.trainer_arguments(config, seed, output_dir, workers, len(data["train"])), beta=config.beta),
        train_dataset=data["train"],
        eval_dataset=training.eval_subset(data["eval"], config.eval_rows, seed),
        processing_class=tokenizer,
        peft_config=training.peft_config(config.adapter, "CAUSAL_LM", base=start),
    )
    return trainer, tokenizer


def _pairs(config: DpoStage, ctx: StageContext, start: Path) -> dict[str, list[dict]]:
    data_dir = ctx.input("data")
    if isinstance(config.pairs, LabelPairs):
        held_out = list(load_splits(data_dir / "prompts")["eval"]["prompt"])
        return pairs.judged_pairs(ctx.site.store(), ctx.site.queue, config.pairs.min_gold_accuracy, held_out)[0]
    if not isinstance(config.pairs, RewardModelPairs):
        preferences = load_splits(data_dir / "preferences")
        return {split: list(preferences[split]) for split in preferences}
    reward_dir = policies.reward_model(ctx, ctx.stage)
    scorer = pairs.reward_model_scorer(models.load_reward_model(reward_dir), models.load_tokenizer(reward_dir))
    return pairs.policy_pairs(
        start, load_splits(data_dir / "prompts"), {"train": config.pairs.count, "eval": config.pairs.eval_count},
        scorer, config.pairs.min_score_gap, config.pairs, ctx.seed,
        pairs.driver_precision(config.precision, ctx.stage, "sampling pairs"),
    )

