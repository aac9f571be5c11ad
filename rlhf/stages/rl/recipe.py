"""Stage 4, RL: our own engine, a LoRA policy against the reward model, on Ray Train or in a process of its own.

One recipe for PPO, GRPO, RLOO and REINFORCE++ (the stage's block says which
estimator). The policy starts from the SFT model, or without an SFT stage
from the block's `policy` (an instruct model, say); the reward model is the
reward stage's, or the block's `reward_model`. With a `ray` block of more
than one worker or a GPU this task is the Ray Train driver; otherwise the
loop runs in a child process, without Ray's start-up. Workers each roll out
their shard of prompts, gradients are all-reduced, rank 0 logs to this
stage's MLflow run and writes checkpoints under the work dir; re-entering
the stage resumes from the newest one. Outputs: `adapter/`,
`model/` (the adapter merged into the starting policy, with the tokenizer),
`critic/` (PPO), `normalisation.json` (the score statistics of the starting
policy), `history.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow

from rlhf import models, plots, precision, registry
from rlhf.blocks import Lora
from rlhf.stages.rl.config import RlStage
from rlhf.data.prepare import load_splits
from rlhf.errors import InputError
from rlhf.generation import render
from rlhf.ppo import driver
from rlhf.lifecycle import StageContext, StageResult
from rlhf.stages import policies

log = logging.getLogger("rlhf")


def train_rl(ctx: StageContext) -> StageResult:
    config: RlStage = precision.for_stage(ctx)
    data_dir, start = ctx.input("data"), policies.starting_policy(ctx, ctx.stage)
    gold = ctx.gold_name

    final = driver.run(
        ctx.stage, config, ctx.pipeline.ray,
        name=f"{ctx.stage}-{ctx.fingerprint}",
        storage=ctx.work / "ray",
        seed=ctx.seed,
        policy_model=start,
        reward_model=policies.reward_model(ctx, ctx.stage),
        critic_lora=_critic_lora(config, ctx),
        prompts=_fitting(list(load_splits(data_dir / "prompts")["train"]["prompt"]), start, config.max_prompt_tokens, ctx.stage),
        gold=gold,
        mlflow_uri=mlflow.get_tracking_uri(),
        mlflow_run_id=ctx.run_id,
    )

    for name in ("adapter", "critic"):
        if (final / name).exists():
            shutil.copytree(final / name, ctx.outputs / name)
    for name in ("history.json", "normalisation.json"):
        shutil.copy(final / name, ctx.outputs / name)
    policy, tokenizer = _merged_policy(start, ctx)
    history = json.loads((final / "history.json").read_text())
    mlflow.log_artifact(str(final / "history.json"), ctx.stage)
    mlflow.log_dict(json.loads((final / "normalisation.json").read_text()), f"{ctx.stage}/normalisation.json")

    mlflow.log_figure(plots.ppo_curves(history), "plots/ppo_curves.png")
    model_uri = registry.log_policy(policy, tokenizer, config.max_new_tokens)
    (ctx.outputs / "mlflow_model.json").write_text(json.dumps({"model_uri": model_uri}))

    last = history[-1]
    metrics = {key: last[key] for key in ("score", "kl", "beta", "response_length", "eos_share", "gold") if key in last}
    metrics["iterations"] = float(last["iteration"])
    metrics["peak_rss_mb"] = max(h["peak_rss_mb"] for h in history)  # per worker
    seconds = sum(h["seconds_generate"] + h["seconds_score"] + h["seconds_train"] for h in history)
    responses = config.batch_size * config.samples_per_prompt
    metrics["response_tokens_per_second"] = sum(h["response_length"] for h in history) * responses / seconds
    return StageResult(metrics=metrics, headline="gold" if gold else "score")


def _fitting(prompts: list, policy_dir: Path, max_tokens: int | None, stage: str) -> list:
    if max_tokens is None:
        return prompts
    tokenizer = models.load_tokenizer(policy_dir)
    kept = [p for p in prompts if len(tokenizer(render(tokenizer, p), add_special_tokens=False).input_ids) <= max_tokens]
    log.info("%s: %d of %d prompts fit in max_prompt_tokens=%d", stage, len(kept), len(prompts), max_tokens)
    if not kept:
        raise InputError(f"stages.{stage}.max_prompt_tokens: no prompt is {max_tokens} tokens or shorter")
    return kept


def _critic_lora(config: RlStage, ctx: StageContext) -> Lora | None:
    """`auto`: a LoRA critic over a pretrained base, a fully trained one over a (small) scratch model."""
    if not config.has_critic:
        return None
    if config.critic_lora != "auto":
        return config.critic_lora
    return Lora() if ctx.pipeline.stages.pretrained(ctx.stage) else None



def _merged_policy(start: Path, ctx: StageContext):
    """The tuned policy as a plain model, saved beside the adapter; returns it and its tokenizer."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(models.load_causal_lm(start), ctx.outputs / "adapter").merge_and_unload()
    tokenizer = models.load_tokenizer(start)
    merged.save_pretrained(ctx.outputs / "model")
    tokenizer.save_pretrained(ctx.outputs / "model")
    return merged, tokenizer
