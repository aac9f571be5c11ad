"""Preference pairs sampled from a policy and labelled by a gold reward (the demo's known truth)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from rlhf import generation
from rlhf.data.formats import Messages, text_of

log = logging.getLogger("rlhf")

Gold = Callable[[str, str], float]


def label(prompt: Messages, first: str, second: str, gold: Gold, min_gap: float) -> dict | None:
    """The pair ordered by gold, or None for a near-tie (gold within `min_gap`) or identical responses."""
    text = text_of(prompt)
    scores = gold(text, first), gold(text, second)
    if first == second or abs(scores[0] - scores[1]) < min_gap:
        return None
    (chosen, chosen_gold), (rejected, rejected_gold) = sorted(zip((first, second), scores), key=lambda x: -x[1])
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "chosen_gold": chosen_gold,
        "rejected_gold": rejected_gold,
    }


def sample_pairs(
    policy, tokenizer, prompts: list[Messages], count: int, gold: Gold, min_gap: float,
    max_new_tokens: int, temperature: float, seed: int, batch_size: int, max_rounds: int = 8,
) -> list[dict]:
    """`count` labelled pairs, two samples per drawn prompt."""
    rng = random.Random(seed)
    pairs = []
    for round_index in range(max_rounds):
        drawn = [rng.choice(prompts) for _ in range(int((count - len(pairs)) * 1.5) + 8)]
        doubled = [p for p in drawn for _ in range(2)]
        responses, _ = generation.sample(
            policy, tokenizer, doubled, max_new_tokens, temperature, seed + round_index, batch_size, phase=f"sampling round {round_index + 1}"
        )
        for index, prompt in enumerate(drawn):
            pair = label(prompt, responses[2 * index], responses[2 * index + 1], gold, min_gap)
            if pair is not None and len(pairs) < count:
                pairs.append(pair)
        log.info("sampled %d/%d pairs (round %d)", len(pairs), count, round_index + 1)
        if len(pairs) == count:
            return pairs
    raise RuntimeError(f"only {len(pairs)} of {count} pairs after {max_rounds} rounds: lower min_gold_gap")
