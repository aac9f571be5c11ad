"""Stage 5, evaluation: a candidate policy (ppo, grpo, dpo, ...) against a baseline on held-out prompts.

The baseline is the SFT policy, or the model the candidate started from
(`baseline: start`). Both answer the same held-out prompts with the same
sampling settings and seed. Reported, as `candidate.*` and `baseline.*`:
reward-model scores (in units of the baseline's: its mean 0, its std 1), the
gold reward when the task has one, response length, EOS share and
distinct-1/2; then the gains and win rates of the candidate under each, its
per-sequence KL to the baseline, and a reward-hacking warning when the
reward model's gain is large but the gold gain is not.
"""

from __future__ import annotations

import json
import random
import statistics

import mlflow
import torch

from rlhf import evaluation, generation, models, plots, precision, registry, stage_log
from rlhf.stages.evaluate.config import EvaluateStage
from rlhf.data.formats import text_of
from rlhf.data.prepare import load_splits
from rlhf.labels.store import NewItem
from rlhf.lifecycle import StageContext, StageResult
from rlhf.stages import policies

ROLES = ("baseline", "candidate")
CPU = torch.device("cpu")  # the evaluation runs in the driver


def evaluate_policies(ctx: StageContext) -> StageResult:
    config: EvaluateStage = precision.for_stage(ctx, model_of=ctx.config.candidate)  # the baseline descends from its start
    chosen = precision.choose(config.precision, CPU)
    stage_log.detail.info(f"{ctx.stage}: {precision.describe(chosen, CPU)}")
    mlflow.log_param("precision_chosen", chosen)
    held_out = list(load_splits(ctx.input("data") / "prompts")["eval"]["prompt"])
    prompts = [held_out[i % len(held_out)] for i in range(config.prompts)]
    gold_reward = ctx.gold()
    gold = gold_reward is not None
    start = policies.starting_policy(ctx, config.candidate)
    tokenizer = models.load_tokenizer(start)
    reward_dir = policies.reward_model(ctx, config.candidate)
    reward_model = precision.frozen(models.load_reward_model, reward_dir, chosen, CPU)
    reward_tokenizer = models.load_tokenizer(reward_dir)
    mlflow.set_tags({"rlhf.candidate": config.candidate, "rlhf.baseline": config.baseline})

    baseline = start if config.baseline == "start" else ctx.upstream[config.baseline] / "model"
    loaded = {role: precision.frozen(models.load_causal_lm, policy, chosen, CPU)
              for role, policy in (("baseline", baseline), ("candidate", ctx.upstream[config.candidate] / "model"))}
    results = {}
    for role, policy in loaded.items():
        responses, ended = generation.sample(
            policy, tokenizer, prompts, config.max_new_tokens, config.temperature, ctx.seed, phase=f"sampling {role}"
        )
        results[role] = {
            "responses": responses,
            "raw": generation.score(reward_model, reward_tokenizer, prompts, responses, max_length=None),
            "gold": [gold_reward(text_of(p), r) for p, r in zip(prompts, responses)] if gold else None,
            "ended": ended,
        }
    mean, std = statistics.fmean(results["baseline"]["raw"]), statistics.pstdev(results["baseline"]["raw"]) or 1.0
    for result in results.values():
        result["score"] = [(s - mean) / std for s in result.pop("raw")]
    # KL(candidate || baseline), estimated on the candidate's own responses
    logp = {role: evaluation.sequence_logprobs(loaded[role], tokenizer, prompts, results["candidate"]["responses"]) for role in ROLES}

    metrics = {"prompts": float(config.prompts), "distinct_held_out_prompts": float(len(held_out))}
    for role, result in results.items():
        metrics[f"{role}.score_mean"] = statistics.fmean(result["score"])
        metrics[f"{role}.score_std"] = statistics.pstdev(result["score"])
        metrics[f"{role}.length_words"] = statistics.fmean(len(r.split()) for r in result["responses"])
        metrics[f"{role}.eos_share"] = statistics.fmean(result["ended"])
        metrics[f"{role}.distinct_1"] = evaluation.distinct_n(result["responses"], 1)
        metrics[f"{role}.distinct_2"] = evaluation.distinct_n(result["responses"], 2)
        if gold:
            metrics[f"{role}.gold_mean"] = statistics.fmean(result["gold"])
    metrics["score_gain"] = metrics["candidate.score_mean"] - metrics["baseline.score_mean"]
    metrics["win_rate_score"] = evaluation.win_rate(results["candidate"]["score"], results["baseline"]["score"])
    metrics["kl_to_baseline"] = statistics.fmean(c - b for c, b in zip(logp["candidate"], logp["baseline"]))
    if gold:
        metrics["gold_gain"] = metrics["candidate.gold_mean"] - metrics["baseline.gold_mean"]
        metrics["win_rate_gold"] = evaluation.win_rate(results["candidate"]["gold"], results["baseline"]["gold"])
    hacking = gold and evaluation.reward_hacking(
        metrics["score_gain"], metrics["gold_gain"], config.hacking.min_score_gain, config.hacking.max_gold_gain
    )
    metrics["reward_hacking"] = float(hacking)
    metrics["registered_version"] = float(_register(config, ctx, metrics, hacking))
    if metrics["registered_version"] and config.registry.min_human_win_rate is not None:
        metrics["human_pairs_queued"] = float(_queue_for_people(config, ctx, prompts, results, int(metrics["registered_version"])))

    mlflow.log_metrics({f"evaluate.{k}": v for k, v in metrics.items()})
    mlflow.set_tag("rlhf.reward_hacking", str(hacking).lower())
    table = {"prompt": [text_of(p) for p in prompts]}
    for role, result in results.items():
        table[f"{role}_response"], table[f"{role}_score"] = result["responses"], result["score"]
        if gold:
            table[f"{role}_gold"] = result["gold"]
    mlflow.log_table(table, artifact_file="evaluate/side_by_side.json")
    _log_plots(ctx, results, gold)
    (ctx.outputs / "evaluation.json").write_text(json.dumps({"candidate": config.candidate, "baseline": config.baseline,
                                                             "metrics": metrics, "table": table}, indent=2))
    return StageResult(metrics=metrics, headline="gold_gain" if gold else "win_rate_score")


def _register(config: EvaluateStage, ctx: StageContext, metrics: dict, hacking: bool) -> int:
    """Register the candidate policy when the gates pass; returns the new version (0 when not registered)."""
    win_rate = metrics.get("win_rate_gold", metrics["win_rate_score"])
    gates = config.registry
    logged = ctx.upstream[config.candidate] / "mlflow_model.json"  # absent for a prompt-learning policy
    if gates is None or hacking or win_rate < gates.min_win_rate or metrics["kl_to_baseline"] > gates.max_kl or not logged.exists():
        mlflow.set_tag("rlhf.registered", "false")
        return 0
    model_uri = json.loads(logged.read_text())["model_uri"]
    version = registry.register(model_uri, f"{ctx.pipeline_name}-policy")
    mlflow.set_tag("rlhf.registered", f"{ctx.pipeline_name}-policy/{version}")
    return int(version)


def _queue_for_people(config: EvaluateStage, ctx: StageContext, prompts: list, results: dict, version: int) -> int:
    """The candidate's and the baseline's responses to the same prompts, in random order, for people to judge
    before `rlhf promote` moves `champion` to this version."""
    rng = random.Random(ctx.seed)
    made_by = {role: {"role": role, "stage": getattr(config, role), "version": version if role == "candidate" else None,
                      "evaluation_run": ctx.run_id} for role in ROLES}
    items = []
    for index, prompt in enumerate(prompts[: config.registry.human_pairs]):
        first, second = rng.sample(ROLES, 2)
        items.append(NewItem(prompt=prompt, response_a=results[first]["responses"][index], response_b=results[second]["responses"][index],
                             policy_a=made_by[first], policy_b=made_by[second], purpose="gate"))
    return ctx.site.store().add_items(ctx.site.queue, f"gate-{ctx.fingerprint}", items)


def _log_plots(ctx: StageContext, results: dict, gold: bool) -> None:
    history = ctx.upstream[ctx.config.candidate] / "history.json"
    if history.exists():  # the RL stages' per-iteration curves
        mlflow.log_figure(plots.ppo_curves(json.loads(history.read_text())), "plots/ppo_curves.png")
    scores = {name: result["score"] for name, result in results.items()}
    mlflow.log_figure(plots.distributions(scores, "reward-model score (normalised)"), "plots/score_distribution.png")
    if gold:
        golds = {name: result["gold"] for name, result in results.items()}
        mlflow.log_figure(plots.distributions(golds, "gold reward"), "plots/gold_distribution.png")
    if ctx.input("reward_model") is not None:
        reward = json.loads((ctx.input("reward_model").parent / "manifest.json").read_text())["metrics"]
        mlflow.log_figure(plots.accuracy_bars(reward["eval_accuracy_before"], reward["eval_accuracy"]), "plots/reward_accuracy.png")

