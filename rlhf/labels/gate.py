"""People as the last gate before promotion: how often they preferred a registered candidate to its baseline,
on the candidate-against-baseline pairs its evaluation queued."""

from __future__ import annotations


def verdict(store, queue: str, version: str) -> dict:
    """Judgements of `version`'s gate pairs: wins, losses, ties, both bad, and the win rate (a tie counts half;
    both-bad judgements say nothing about which is better and are left out of it, None while there is nothing to rate)."""
    counts = {"judgements": 0, "wins": 0, "losses": 0, "ties": 0, "both_bad": 0}
    evaluation_run = None
    for judgement in store.judgements(queue, purpose="gate"):
        side = next((s for s in ("A", "B") if _is_candidate(judgement[f"policy_{s.lower()}"], version)), None)
        if side is None:
            continue
        evaluation_run = judgement[f"policy_{side.lower()}"].get("evaluation_run")
        counts["judgements"] += 1
        choice = judgement["choice"]
        counts["wins" if choice == side else "ties" if choice == "tie" else "both_bad" if choice == "both_bad" else "losses"] += 1
    rated = counts["wins"] + counts["losses"] + counts["ties"]
    win_rate = (counts["wins"] + counts["ties"] / 2) / rated if rated else None
    return counts | {"win_rate": win_rate, "evaluation_run": evaluation_run}


def _is_candidate(policy: dict, version: str) -> bool:
    return policy.get("role") == "candidate" and str(policy.get("version")) == str(version)
