"""Stage 2, instruction SFT: TRL's SFTTrainer on the prepared instruction data, loss on completions.

A scratch model (demo) is trained fully; a pretrained one fully or with LoRA.
Without instruction data (HH-RLHF has preference pairs only) it trains on
the prompts and the first assistant turn of the chosen replies.
It runs here, or on Ray Train when the `ray` block asks for more than one
worker or a GPU (`rlhf/trl_fit.py`); re-entering the stage resumes from the
newest checkpoint in the same MLflow run. Outputs: `model/` (LoRA merged, with the
tokenizer), `adapter/` when LoRA was used, and the metrics.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import mlflow
from trl import SFTConfig, SFTTrainer

from rlhf import generation, models, precision, trainer_args, training, trl_fit
from rlhf.stages.sft.config import SftStage
from rlhf.data.formats import text_of
from rlhf.data.prepare import load_splits
from rlhf.lifecycle import StageContext, StageResult


def train_sft(ctx: StageContext) -> StageResult:
    config: SftStage = precision.for_stage(ctx)
    data_dir = ctx.input("data")
    texts = (text_of(row["prompt"]) + "\n" + text_of(row["completion"]) for row in _instructions(data_dir)["train"])
    base = models.provision(config.model, texts, ctx.seed, f"stages.{ctx.stage}.model", ctx.work / "base", ctx.home)

    fitted = trl_fit.fit(
        partial(make_trainer, config.model_dump(mode="json"), ctx.seed, base, data_dir, ctx.pipeline.ray.num_workers),
        ctx.pipeline.ray, name=f"sft-{ctx.fingerprint}", work=ctx.work, outputs=ctx.outputs, seed=ctx.seed,
        mlflow_uri=mlflow.get_tracking_uri(), mlflow_run_id=ctx.run_id,
    )
    metrics = {
        "eval_loss": fitted.eval["eval_loss"],
        "eval_loss_first": fitted.first_eval_loss,
        "train_loss": fitted.train_loss,
        "train_steps": float(fitted.steps),
        "train_tokens_per_second": fitted.tokens_per_second,
        "resumed_from_step": float(fitted.resumed_from_step),
        "peak_rss_mb": fitted.peak_rss_mb,
        "parameters": float(fitted.parameters),
    }
    mlflow.log_metrics({f"sft.{k}": v for k, v in metrics.items()})
    _log_samples(config, ctx, _instructions(data_dir)["eval"], models.load_tokenizer(ctx.outputs / "model"))
    return StageResult(metrics=metrics, headline="eval_loss")


def make_trainer(config: dict, seed: int, base: Path, data_dir: Path, workers: int, output_dir: Path):
    """TRL's SFTTrainer with its tokenizer, from plain values (Ray workers build it too); loss on completions."""
    config = SftStage.model_validate(config)
    data = _instructions(data_dir)
    tokenizer = models.load_tokenizer(base)
    trainer = SFTTrainer(
        model=models.load_causal_lm(base),
        args=SFTConfig(**trainer_args.trainer_arguments(config, seed, output_dir, workers, len(data["train"])), completion_only_loss=True),
        train_dataset=data["train"],
        eval_dataset=training.eval_subset(data["eval"], config.eval_rows, seed),
        processing_class=tokenizer,
        peft_config=training.peft_config(config.adapter, "CAUSAL_LM", base=base),
    )
    return trainer, tokenizer



def _instructions(data_dir: Path):
    if (data_dir / "instructions").exists():
        return load_splits(data_dir / "instructions")
    pairs = load_splits(data_dir / "preferences")
    return pairs.map(lambda pair: {"completion": pair["chosen"][:1]}, remove_columns=["chosen", "rejected"])


def _log_samples(config: SftStage, ctx: StageContext, eval_data, tokenizer) -> None:
    """A table of generations on held-out prompts, scored by gold when the task has one."""
    if config.samples == 0:
        return
    prompts = [row["prompt"] for row in eval_data.shuffle(seed=ctx.seed).select(range(min(config.samples, len(eval_data))))]
    policy = models.load_causal_lm(ctx.outputs / "model")
    responses, _ = generation.sample(policy, tokenizer, prompts, config.max_new_tokens, 1.0, ctx.seed)
    table = {"prompt": [text_of(p) for p in prompts], "response": responses}
    gold = ctx.gold()
    if gold is not None:
        table["gold"] = [gold(text_of(p), r) for p, r in zip(prompts, responses)]
    mlflow.log_table(table, artifact_file="samples/sft_generations.json")
