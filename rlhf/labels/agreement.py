"""How much annotators agree beyond chance: Cohen's kappa for two, Fleiss' kappa for many.

Kappa is what annotation teams report (Label Studio, Argilla, papers): raw agreement looks high
whenever one answer dominates, kappa discounts the agreement that chance alone would give.
Categories are the ones that occur; a category nobody used changes neither statistic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import combinations


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Two raters' answers on the same items, in the same order.

    None when kappa is undefined: no items, or chance agreement is certain (both gave one and the
    same answer throughout), where agreement beyond chance cannot be measured.
    """
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: {len(a)} answers against {len(b)}")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def fleiss_kappa(ratings: Sequence[Sequence[str]]) -> float | None:
    """Each item's answers, one per rater; items with fewer than two answers carry no agreement and are skipped.

    Items may have different numbers of raters: each item's agreement uses its own count n_i
    (P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1))) and the category shares pool all answers. With equal
    counts this is exactly Fleiss' kappa; with unequal ones it uses every overlapping item instead of
    dropping the items whose count differs from the most common. None when undefined (no item, or
    one category only).
    """
    items = [Counter(answers) for answers in ratings if len(answers) >= 2]
    if not items:
        return None
    agreement = []
    pooled: Counter[str] = Counter()
    for counts in items:
        n = sum(counts.values())
        agreement.append((sum(k * k for k in counts.values()) - n) / (n * (n - 1)))
        pooled.update(counts)
    total = sum(pooled.values())
    expected = sum((k / total) ** 2 for k in pooled.values())
    if expected == 1:
        return None
    return (sum(agreement) / len(agreement) - expected) / (1 - expected)


def agreement(choices: Mapping[object, Mapping[str, str]]) -> dict:
    """`choices[item][annotator]` -> Cohen's kappa of every pair that shares an item (and their mean) and Fleiss' kappa.

    The mean is over the pairs whose kappa is defined, each pair weighted alike, so one prolific pair
    does not stand for the whole team.
    """
    overlapping = {item: by for item, by in choices.items() if len(by) >= 2}
    shared: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for by in overlapping.values():
        for a, b in combinations(sorted(by), 2):
            shared.setdefault((a, b), []).append((by[a], by[b]))
    pairs = [
        {"a": a, "b": b, "items": len(answers), "kappa": cohen_kappa(*zip(*answers))}
        for (a, b), answers in sorted(shared.items())
    ]
    defined = [pair["kappa"] for pair in pairs if pair["kappa"] is not None]
    return {
        "cohen_kappa": sum(defined) / len(defined) if defined else None,
        "pairs": pairs,
        "fleiss_kappa": fleiss_kappa([list(by.values()) for by in overlapping.values()]),
        "overlapping_items": len(overlapping),
    }
