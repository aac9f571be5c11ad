"""Comparing two policies' responses: win rates, diversity, KL, and the reward-hacking check."""

from __future__ import annotations

import torch

from rlhf.generation import render


def win_rate(candidate: list[float], baseline: list[float]) -> float:
    """Share of paired responses where the candidate scores higher; ties count half."""
    wins = sum(1.0 if c > b else 0.5 if c == b else 0.0 for c, b in zip(candidate, baseline))
    return wins / len(candidate)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams over all n-grams in all responses (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def reward_hacking(score_gain: float, gold_gain: float, min_score_gain: float, max_gold_gain: float) -> bool:
    """The reward model says much better while the truth says no better (or worse)."""
    return score_gain >= min_score_gain and gold_gain <= max_gold_gain


@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts, responses: list[str]) -> list[float]:
    """Sum of log p(response tokens | prompt), EOS included, at temperature 1."""
    model.eval()
    totals = []
    for prompt, response in zip(prompts, responses):
        context = len(tokenizer(render(tokenizer, prompt), add_special_tokens=False).input_ids)
        full = tokenizer(render(tokenizer, prompt, response), add_special_tokens=False, return_tensors="pt").input_ids
        logits = model(input_ids=full).logits[0, -full.shape[1] :]  # prompt tuning puts its virtual tokens first
        logits = logits[context - 1 : -1]
        tokens = full[0, context:]
        totals.append(torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).sum().item())
    return totals
