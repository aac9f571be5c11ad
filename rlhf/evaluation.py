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
def sequence_logprobs(model, tokenizer, prompts, responses: list[str], batch_size: int = 16) -> list[float]:
    """Sum of log p(response tokens | prompt), EOS included, at temperature 1. Sequences run `batch_size` at a
    time, padded on the right: attention is causal, so no real token sees the padding or changes position."""
    model.eval()
    contexts = [len(tokenizer(render(tokenizer, p), add_special_tokens=False).input_ids) for p in prompts]
    fulls = [tokenizer(render(tokenizer, p, r), add_special_tokens=False).input_ids for p, r in zip(prompts, responses)]
    totals = []
    for start in range(0, len(fulls), batch_size):
        rows = fulls[start : start + batch_size]
        width = max(map(len, rows))
        input_ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=model.device)
        attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=model.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width:]  # prompt tuning puts its virtual tokens first
        for row, context, row_logits in zip(rows, contexts[start:], logits):
            tokens = torch.tensor(row[context:], device=model.device)
            logp = torch.log_softmax(row_logits[context - 1 : len(row) - 1].float(), -1)
            totals.append(logp.gather(-1, tokens.unsqueeze(-1)).sum().item())
    return totals
