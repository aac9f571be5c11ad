"""Preference pairs sampled from a policy, two responses per prompt ordered by a scorer, or judged by people.

The scorer is the task's gold reward (reward-model training on the demo) or
a trained reward model (on-policy DPO). People's judgements come from the
pipeline's queue in the label store.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable

import torch

from rlhf import generation, models, precision, stage_log
from rlhf.data.formats import Messages, text_of

log = logging.getLogger("rlhf")

CPU = torch.device("cpu")  # pairs are sampled and scored in the driver
Scorer = Callable[[list[Messages], list[str]], list[float]]  # prompts, responses -> scores


def gold_scorer(gold: Callable[[str, str], float]) -> Scorer:
    return lambda prompts, responses: [gold(text_of(p), r) for p, r in zip(prompts, responses)]


def reward_model_scorer(model, tokenizer) -> Scorer:
    return lambda prompts, responses: generation.score(model, tokenizer, prompts, responses, max_length=None)


def driver_precision(setting: str, stage: str, work: str) -> str:
    """What `stage`, whose block says `precision: setting`, does `work` in on the CPU, in the driver (sampling
    pairs, scoring them); said in its log."""
    chosen = precision.choose(setting, CPU)
    stage_log.detail.info(f"{stage}: {work}: {precision.describe(chosen, CPU)}")
    return chosen


def policy_pairs(policy_dir, prompts, counts: dict[str, int], scorer: Scorer, min_gap: float, sampling, seed: int,
                 chosen: str) -> dict[str, list[dict]]:
    """Pairs for each split (`counts`: train, eval) from that split's prompts, sampled on the CPU in `chosen`
    precision; `sampling` is the stage's pairs block (max_new_tokens, temperature, batch_size)."""
    policy = precision.frozen(models.load_causal_lm, policy_dir, chosen, CPU)
    tokenizer = models.load_tokenizer(policy_dir)
    return {
        split: sample_pairs(policy, tokenizer, list(prompts[split]["prompt"]), count, scorer, min_gap,
                            sampling.max_new_tokens, sampling.temperature, seed + offset, sampling.batch_size)
        for (split, count), offset in zip(counts.items(), (0, 10_000))
    }


def label(prompt: Messages, first: str, second: str, scores: tuple[float, float], min_gap: float) -> dict | None:
    """The pair ordered by score, or None for a near-tie (scores within `min_gap`) or identical responses."""
    if first == second or abs(scores[0] - scores[1]) < min_gap:
        return None
    (chosen, chosen_score), (rejected, rejected_score) = sorted(zip((first, second), scores), key=lambda x: -x[1])
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "chosen_score": chosen_score,
        "rejected_score": rejected_score,
    }


def sample_pairs(
    policy, tokenizer, prompts: list[Messages], count: int, scorer: Scorer, min_gap: float,
    max_new_tokens: int, temperature: float, seed: int, batch_size: int, max_rounds: int = 8,
) -> list[dict]:
    """`count` labelled pairs, two samples per drawn prompt."""
    rng = random.Random(seed)
    pairs = []
    for round_index in range(max_rounds):
        drawn = [rng.choice(prompts) for _ in range(int((count - len(pairs)) * 1.5) + 8)]
        doubled = [p for p in drawn for _ in range(2)]
        responses, _ = generation.sample(
            policy, tokenizer, drawn, max_new_tokens, temperature, seed + round_index, batch_size,
            phase=f"sampling round {round_index + 1}", repeats=2,
        )
        scores = scorer(doubled, responses)
        for index, prompt in enumerate(drawn):
            pair = label(prompt, responses[2 * index], responses[2 * index + 1], tuple(scores[2 * index : 2 * index + 2]), min_gap)
            if pair is not None and len(pairs) < count:
                pairs.append(pair)
        log.info("sampled %d/%d pairs (round %d)", len(pairs), count, round_index + 1)
        if len(pairs) == count:
            return pairs
    raise RuntimeError(f"only {len(pairs)} of {count} pairs after {max_rounds} rounds: lower the minimum gap")


def judged_pairs(store, queue: str, min_gold_accuracy: float | None, held_out: list[Messages]) -> tuple[dict[str, list[dict]], dict]:
    """People's pairs of `queue`, split as the other sources are: those on held-out prompts are held out.
    Also returns the counts of what was dropped (ties, both bad, no majority, annotators left out)."""
    rows, counts = store.preference_pairs(queue, min_gold_accuracy)
    held = {_key(prompt) for prompt in held_out}
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for row in rows:
        splits["eval" if _key(row["prompt"]) in held else "train"].append(
            {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
        )
    return splits, counts


def _key(prompt: Messages) -> str:
    return json.dumps(prompt, sort_keys=True)
