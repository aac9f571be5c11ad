"""Stage 5, evaluation: the PPO policy against its starting policy on held-out prompts.

The baseline is the SFT policy (metrics `sft.*`), or without an SFT stage the
model PPO started from (`start.*`). Both policies answer the same held-out
prompts with the same sampling settings and seed. Reported: reward-model
scores (normalised as PPO normalised them), the gold reward when the task
has one, win rates of PPO over the baseline under each, the per-sequence KL
of the PPO policy to the baseline, response length, EOS share and
distinct-1/2, and a reward-hacking warning when the reward model's gain is
large but the gold gain is not.
"""

from __future__ import annotations

import json
import statistics

import mlflow
from prefect import task
from prefect.cache_policies import NONE

from rlhf import evaluation, generation, models, plots, registry
from rlhf import gold as rlhf_gold
from rlhf.config import EvaluateStage
from rlhf.data.formats import text_of
from rlhf.data.prepare import load_splits
from rlhf.stages import StageContext, StageRecord, StageResult, StageSpec, run_stage
from tasks.ppo import reward_model_dir, starting_policy


def evaluate_policies(ctx: StageContext) -> StageResult:
    config: EvaluateStage = ctx.config
    data_dir, ppo_dir = ctx.upstream["data"], ctx.upstream["ppo"]
    held_out = list(load_splits(data_dir / "prompts")["eval"]["prompt"])
    prompts = [held_out[i % len(held_out)] for i in range(config.prompts)]
    gold_reward = rlhf_gold.of_data(data_dir)
    gold = gold_reward is not None
    start = starting_policy(ctx)
    base = "sft" if "sft" in ctx.upstream else "start"
    tokenizer = models.load_tokenizer(start)
    reward_dir = reward_model_dir(ctx)
    reward_model, reward_tokenizer = models.load_reward_model(reward_dir), models.load_tokenizer(reward_dir)
    normalisation = json.loads((ppo_dir / "normalisation.json").read_text())

    policies = {base: models.load_causal_lm(start), "ppo": models.load_causal_lm(ppo_dir / "model")}
    results = {}
    for name, policy in policies.items():
        responses, ended = generation.sample(
            policy, tokenizer, prompts, config.max_new_tokens, config.temperature, ctx.seed, phase=f"sampling {name}"
        )
        raw = generation.score(reward_model, reward_tokenizer, prompts, responses, max_length=None)
        results[name] = {
            "responses": responses,
            "score": [(s - normalisation["mean"]) / normalisation["std"] for s in raw],
            "gold": [gold_reward(text_of(p), r) for p, r in zip(prompts, responses)] if gold else None,
            "ended": ended,
        }
    ppo_logp = evaluation.sequence_logprobs(policies["ppo"], tokenizer, prompts, results["ppo"]["responses"])
    base_logp = evaluation.sequence_logprobs(policies[base], tokenizer, prompts, results["ppo"]["responses"])

    metrics = {"prompts": float(config.prompts), "distinct_held_out_prompts": float(len(held_out))}
    for name, result in results.items():
        metrics[f"{name}.score_mean"] = statistics.fmean(result["score"])
        metrics[f"{name}.score_std"] = statistics.pstdev(result["score"])
        metrics[f"{name}.length_words"] = statistics.fmean(len(r.split()) for r in result["responses"])
        metrics[f"{name}.eos_share"] = statistics.fmean(result["ended"])
        metrics[f"{name}.distinct_1"] = evaluation.distinct_n(result["responses"], 1)
        metrics[f"{name}.distinct_2"] = evaluation.distinct_n(result["responses"], 2)
        if gold:
            metrics[f"{name}.gold_mean"] = statistics.fmean(result["gold"])
    metrics["score_gain"] = metrics["ppo.score_mean"] - metrics[f"{base}.score_mean"]
    metrics["win_rate_score"] = evaluation.win_rate(results["ppo"]["score"], results[base]["score"])
    metrics[f"kl_to_{base}"] = statistics.fmean(p - s for p, s in zip(ppo_logp, base_logp))
    if gold:
        metrics["gold_gain"] = metrics["ppo.gold_mean"] - metrics[f"{base}.gold_mean"]
        metrics["win_rate_gold"] = evaluation.win_rate(results["ppo"]["gold"], results[base]["gold"])
    hacking = gold and evaluation.reward_hacking(
        metrics["score_gain"], metrics["gold_gain"], config.hacking.min_score_gain, config.hacking.max_gold_gain
    )
    metrics["reward_hacking"] = float(hacking)
    metrics["registered_version"] = float(_register(config, ctx, metrics, metrics[f"kl_to_{base}"], hacking))

    mlflow.log_metrics({f"evaluate.{k}": v for k, v in metrics.items()})
    mlflow.set_tag("rlhf.reward_hacking", str(hacking).lower())
    table = {"prompt": [text_of(p) for p in prompts]}
    for name, result in results.items():
        table[f"{name}_response"], table[f"{name}_score"] = result["responses"], result["score"]
        if gold:
            table[f"{name}_gold"] = result["gold"]
    mlflow.log_table(table, artifact_file="evaluate/side_by_side.json")
    _log_plots(ctx, results, gold)
    (ctx.outputs / "evaluation.json").write_text(json.dumps({"metrics": metrics, "table": table}, indent=2))
    return StageResult(metrics=metrics, headline="gold_gain" if gold else "win_rate_score")


def _register(config: EvaluateStage, ctx: StageContext, metrics: dict, kl: float, hacking: bool) -> int:
    """Register the PPO policy when the gates pass; returns the new version (0 when not registered)."""
    win_rate = metrics.get("win_rate_gold", metrics["win_rate_score"])
    gates = config.registry
    if gates is None or hacking or win_rate < gates.min_win_rate or kl > gates.max_kl:
        mlflow.set_tag("rlhf.registered", "false")
        return 0
    model_uri = json.loads((ctx.upstream["ppo"] / "mlflow_model.json").read_text())["model_uri"]
    version = registry.register(model_uri, f"{ctx.pipeline_name}-policy")
    mlflow.set_tag("rlhf.registered", f"{ctx.pipeline_name}-policy/{version}")
    return int(version)


def _log_plots(ctx: StageContext, results: dict, gold: bool) -> None:
    history = json.loads((ctx.upstream["ppo"] / "history.json").read_text())
    mlflow.log_figure(plots.ppo_curves(history), "plots/ppo_curves.png")
    scores = {name: result["score"] for name, result in results.items()}
    mlflow.log_figure(plots.distributions(scores, "reward-model score (normalised)"), "plots/score_distribution.png")
    if gold:
        golds = {name: result["gold"] for name, result in results.items()}
        mlflow.log_figure(plots.distributions(golds, "gold reward"), "plots/gold_distribution.png")
    if "reward" in ctx.upstream:
        reward = json.loads((ctx.upstream["reward"].parent / "manifest.json").read_text())["metrics"]
        mlflow.log_figure(plots.accuracy_bars(reward["eval_accuracy_before"], reward["eval_accuracy"]), "plots/reward_accuracy.png")


@task(name="evaluate", cache_policy=NONE, persist_result=False)
def evaluate(spec: StageSpec) -> StageRecord:
    return run_stage(spec, evaluate_policies)
