"""The propose stage: pairs of a policy's responses, queued in the label store for people to judge.

The policy is the pipeline's own (SFT's) or a registered one (`models:/NAME@champion`),
so a loop asks people about the policy it ships. Pairs are two samples on one
prompt, drawn from training prompts and (`eval_count`) from held-out ones,
identical responses dropped; `uncertain` keeps those the current reward model
scores closest. A share of them (`overlap`) is asked of two annotators, and
gold-check pairs with a clear gold gap are mixed in when the task has a gold
reward. The whole batch enters the queue in one transaction, keyed by the
stage's fingerprint, so a rerun never queues it twice. With `simulate`,
simulated annotators then judge the queue through the page's HTTP API.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import mlflow

from rlhf import generation, models, pairs, registry
from rlhf.data.formats import Messages, text_of
from rlhf.data.prepare import load_splits
from rlhf.labels.server import serving
from rlhf.labels.simulate import simulate
from rlhf.labels.store import NewItem
from rlhf.lifecycle import StageContext, StageResult
from rlhf.stages.propose.config import ProposeStage

_GOLD_GAP = 0.5  # a gold-check pair's gold rewards differ at least this much: its answer is not a matter of taste


def propose_pairs(ctx: StageContext) -> StageResult:
    config: ProposeStage = ctx.config
    policy_dir, made_by = _policy(config, ctx)
    policy, tokenizer = models.load_causal_lm(policy_dir), models.load_tokenizer(policy_dir)
    prompts = load_splits(ctx.input("data") / "prompts")
    score_gaps = _score_gaps(config, ctx)
    rng = random.Random(ctx.seed)

    items, sampled_gaps = [], []
    for split, count, offset in (("train", config.count, 0), ("eval", config.eval_count, 10_000)):
        drawn = _sample(policy, tokenizer, list(prompts[split]["prompt"]), count * config.candidates if score_gaps else count,
                        config, ctx.seed + offset, split)
        gaps = score_gaps(drawn) if score_gaps else [None] * len(drawn)
        sampled_gaps += gaps
        chosen = sorted(range(len(drawn)), key=gaps.__getitem__)[:count] if score_gaps else range(len(drawn))
        for i in chosen:
            items.append(_item(*drawn[i], made_by, votes=2 if rng.random() < config.overlap else 1, rng=rng, score_gap=gaps[i]))
    items += _gold_checks(config, ctx, policy, tokenizer, list(prompts["train"]["prompt"]), made_by, rng)

    store = ctx.site.store()
    queued = store.add_items(ctx.site.queue, ctx.fingerprint, items)
    metrics = {"pairs": float(queued), "gold_checks": float(sum(i.gold_choice is not None for i in items)),
               "two_annotator_pairs": float(sum(i.votes > 1 for i in items))}
    if score_gaps:  # how much closer the kept pairs are than those sampled: what `uncertain` buys
        metrics["score_gap_kept"] = statistics.fmean(i.score_gap for i in items if i.score_gap is not None)
        metrics["score_gap_sampled"] = statistics.fmean(sampled_gaps)
    if config.simulate is not None:
        metrics |= _simulate(config, ctx)
    metrics["queue_pending"] = float(store.stats(ctx.site.queue)["queue"]["pending"])
    mlflow.log_metrics({f"propose.{k}": v for k, v in metrics.items()})
    mlflow.set_tag("rlhf.queue", ctx.site.queue)
    return StageResult(metrics=metrics, headline="pairs")


def _policy(config: ProposeStage, ctx: StageContext) -> tuple:
    """The policy's directory, and what the items record as having made their responses."""
    if config.policy is None:
        provider = ctx.providers["policy"]
        return ctx.upstream[provider] / "model", {"stage": provider, "pipeline": ctx.pipeline_name, "fingerprint": ctx.upstream[provider].parent.name}
    version = ctx.site.registered_version(config.policy)
    name = config.policy.removeprefix("models:/").partition("@")[0]
    return registry.download(f"models:/{name}/{version}", ctx.work / "policy"), {"model": config.policy, "version": version}


def _sample(policy, tokenizer, prompts: list[Messages], count: int, config: ProposeStage, seed: int, split: str,
            max_rounds: int = 8) -> list[tuple[Messages, str, str]]:
    """`count` pairs of two different responses to one prompt."""
    rng, found = random.Random(seed), []
    for round_index in range(max_rounds):
        drawn = [rng.choice(prompts) for _ in range(int((count - len(found)) * 1.2) + 4)]
        responses, _ = generation.sample(policy, tokenizer, drawn, config.max_new_tokens, config.temperature,
                                         seed + round_index, config.batch_size,
                                         phase=f"sampling {split} pairs, round {round_index + 1}", repeats=2)
        found += [(p, a, b) for p, a, b in zip(drawn, responses[::2], responses[1::2]) if a != b][: count - len(found)]
        if len(found) == count:
            return found
    raise RuntimeError(f"only {len(found)} of {count} {split} pairs with two different responses after {max_rounds} rounds")


def _score_gaps(config: ProposeStage, ctx: StageContext):
    """For `uncertain`: a function giving the reward model's score gap of each sampled pair (the smallest are kept);
    None for `random`, or while the pipeline has trained no reward model yet (the first round of a loop)."""
    if config.select == "random":
        return None
    newest = ctx.site.newest(config._reward_stage)
    reward_dir = config.reward_model or (newest and Path(newest["outputs"]["path"]) / "model")
    if reward_dir is None:
        mlflow.set_tag("rlhf.select", "random: no reward model yet")
        return None
    scorer = pairs.reward_model_scorer(models.load_reward_model(reward_dir), models.load_tokenizer(reward_dir))

    def gaps(drawn: list) -> list[float]:
        scores = scorer([p for p, *_ in drawn for _ in range(2)], [r for _, a, b in drawn for r in (a, b)])
        return [abs(x - y) for x, y in zip(scores[::2], scores[1::2])]

    return gaps


def _gold_checks(config, ctx, policy, tokenizer, prompts, made_by, rng) -> list[NewItem]:
    """Pairs whose gold rewards differ clearly: their answer is known, and annotators are measured on them."""
    if not config.gold_checks:
        return []
    gold, checks = ctx.gold(), []
    for prompt, a, b in _sample(policy, tokenizer, prompts, config.gold_checks * 8, config, ctx.seed + 20_000, "gold-check"):
        gap = gold(text_of(prompt), a) - gold(text_of(prompt), b)
        if abs(gap) >= _GOLD_GAP and len(checks) < config.gold_checks:
            checks.append(_item(prompt, a, b, made_by, votes=1, rng=rng, gold_choice="A" if gap > 0 else "B"))
    return checks


def _item(prompt, a: str, b: str, made_by: dict, votes: int, rng: random.Random, gold_choice: str | None = None,
          score_gap: float | None = None) -> NewItem:
    if rng.random() < 0.5:  # whichever sample came first is A only half the time
        a, b = b, a
        gold_choice = {"A": "B", "B": "A"}.get(gold_choice)
    return NewItem(prompt=prompt, response_a=a, response_b=b, policy_a=made_by, policy_b=made_by, votes=votes,
                   gold_choice=gold_choice, score_gap=score_gap)


def _simulate(config: ProposeStage, ctx: StageContext) -> dict[str, float]:
    """Simulated annotators judge the whole queue through the page, as people would."""
    store = ctx.site.store()
    tokens = [store.add_annotator(f"sim-{i + 1}") for i in range(config.simulate.annotators)]
    with serving(store, ctx.site.queue, seed=ctx.seed) as url:
        result = simulate(url, tokens, ctx.gold(), config.simulate.temperature, ctx.seed, concurrency=1,
                          tie_margin=config.simulate.tie_margin)
    return {"simulated_judgements": float(result["judgements"]), "simulated_label_noise": float(result["noise"] or 0.0)}
