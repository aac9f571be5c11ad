"""Stage 2, instruction SFT: TRL's SFTTrainer on the prepared instruction data, loss on completions.

A scratch model (demo) is trained fully; a pretrained one fully or with LoRA.
Without instruction data (HH-RLHF has preference pairs only) it trains on
the prompts and the first assistant turn of the chosen replies.
Checkpoints land in the work dir; re-entering the stage resumes from the
newest one in the same MLflow run. Outputs: `model/` (LoRA merged, with the
tokenizer), `adapter/` when LoRA was used, and the metrics.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import task
from prefect.cache_policies import NONE
from trl import SFTConfig, SFTTrainer

from rlhf import generation, models, training
from rlhf import gold as rlhf_gold
from rlhf.config import SftStage
from rlhf.data.formats import text_of
from rlhf.data.prepare import load_splits
from rlhf.stages import StageContext, StageRecord, StageResult, StageSpec, run_stage


def train_sft(ctx: StageContext) -> StageResult:
    config: SftStage = ctx.config
    data = _instructions(ctx.upstream["data"])
    texts = (text_of(row["prompt"]) + "\n" + text_of(row["completion"]) for row in data["train"])
    base = models.provision(config.model, texts, ctx.seed, "stages.sft.model", ctx.work / "base", ctx.home)
    tokenizer = models.load_tokenizer(base)
    model = models.load_causal_lm(base)

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            **training.trainer_arguments(config, ctx.seed, ctx.work / "trainer"),
            completion_only_loss=True,
        ),
        train_dataset=data["train"],
        eval_dataset=training.eval_subset(data["eval"], config.eval_rows, ctx.seed),
        processing_class=tokenizer,
        peft_config=training.lora_config(config.lora, "CAUSAL_LM"),
    )
    checkpoint, resumed_from_step = training.resume_point(ctx.work / "trainer")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    final = trainer.evaluate()

    training.save_policy(trainer, tokenizer, ctx.outputs)
    first_eval = next(entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry)
    metrics = {
        "eval_loss": final["eval_loss"],
        "eval_loss_first": first_eval,
        "train_loss": result.training_loss,
        "train_steps": float(trainer.state.global_step),
        "train_tokens_per_second": training.tokens_per_second(
            trainer.state.log_history, resumed_from_step, result.metrics["train_runtime"]
        ),
        "resumed_from_step": float(resumed_from_step),
        "peak_rss_mb": training.peak_rss_mb(),
        "parameters": float(model.num_parameters()),
    }
    mlflow.log_metrics({f"sft.{k}": v for k, v in metrics.items()})
    _log_samples(config, ctx, data["eval"], tokenizer)
    return StageResult(metrics=metrics, headline="eval_loss")


@task(name="sft", cache_policy=NONE, persist_result=False)
def sft(spec: StageSpec) -> StageRecord:
    return run_stage(spec, train_sft)


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
    gold = rlhf_gold.of_data(ctx.upstream["data"])
    if gold is not None:
        table["gold"] = [gold(text_of(p), r) for p, r in zip(prompts, responses)]
    mlflow.log_table(table, artifact_file="samples/sft_generations.json")
