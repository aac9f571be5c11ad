"""Stage 4, PPO: our own engine on Ray Train, a LoRA policy on the SFT model against the reward model.

This task is the Ray driver. Workers each roll out their shard of prompts,
gradients are all-reduced, rank 0 logs to this stage's MLflow run and writes
checkpoints under the work dir; re-entering the stage resumes from the
newest one. Outputs: `adapter/`, `model/` (the adapter merged into the SFT
model, with the tokenizer), `critic/`, `history.json`.
"""

from __future__ import annotations

import json
import shutil

import mlflow
from prefect import task
from prefect.cache_policies import NONE

from rlhf import models, plots, registry
from rlhf.config import PpoStage
from rlhf.data.prepare import load_splits
from rlhf.ppo import driver
from rlhf.stages import StageContext, StageRecord, StageResult, StageSpec, run_stage


def train_ppo(ctx: StageContext) -> StageResult:
    config: PpoStage = ctx.config
    data_dir, sft_model, reward_dir = ctx.upstream["data"], ctx.upstream["sft"] / "model", ctx.upstream["reward"]
    gold = json.loads((data_dir / "task.json").read_text())["gold_reward"] is not None

    final = driver.run(
        config, ctx.pipeline.ray,
        name=f"ppo-{ctx.fingerprint}",
        storage=ctx.work / "ray",
        seed=ctx.seed,
        sft_model=sft_model,
        reward_dir=reward_dir,
        prompts=list(load_splits(data_dir / "prompts")["train"]["prompt"]),
        gold=gold,
        mlflow_uri=mlflow.get_tracking_uri(),
        mlflow_run_id=ctx.run_id,
    )

    shutil.copytree(final / "adapter", ctx.outputs / "adapter")
    shutil.copytree(final / "critic", ctx.outputs / "critic")
    shutil.copy(final / "history.json", ctx.outputs / "history.json")
    _merge_policy(sft_model, ctx)
    history = json.loads((final / "history.json").read_text())
    mlflow.log_artifact(str(final / "history.json"), "ppo")

    mlflow.log_figure(plots.ppo_curves(history), "plots/ppo_curves.png")
    prompt = load_splits(data_dir / "prompts")["eval"]["prompt"][0][-1]["content"]
    model_uri = registry.log_policy(ctx.outputs / "model", prompt, "A sampled review.")
    (ctx.outputs / "mlflow_model.json").write_text(json.dumps({"model_uri": model_uri}))

    last = history[-1]
    metrics = {key: last[key] for key in ("score", "kl", "beta", "response_length", "eos_share", "gold") if key in last}
    metrics["iterations"] = float(last["iteration"])
    return StageResult(metrics=metrics, headline="gold" if gold else "score")


@task(name="ppo", cache_policy=NONE, persist_result=False)
def ppo(spec: StageSpec) -> StageRecord:
    return run_stage(spec, train_ppo)


def _merge_policy(sft_model, ctx: StageContext) -> None:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(models.load_causal_lm(sft_model), ctx.outputs / "adapter").merge_and_unload()
    merged.save_pretrained(ctx.outputs / "model")
    models.load_tokenizer(sft_model).save_pretrained(ctx.outputs / "model")
