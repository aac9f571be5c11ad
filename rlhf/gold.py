"""Gold rewards: programmatic truths a task can be scored by, looked up by the name in `task.json`.

PPO only ever optimises the learned reward model; a gold reward labels the
policy-sampled preference pairs and measures, in the logs and the
evaluation, whether what the reward model taught is real.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

from rlhf import synthetic_reviews

Gold = Callable[[str, str], float]  # (prompt text, response text) -> score


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_positive(prompt: str, response: str) -> float:
    """VADER's compound sentiment of the response, in [-1, 1] (rule-based, offline; Hutto and Gilbert, 2014)."""
    return _vader().polarity_scores(response)["compound"]


GOLD: dict[str, Gold] = {"synthetic_reviews": synthetic_reviews.gold_reward, "vader_positive": vader_positive}


def named(name: str | None) -> Gold | None:
    return GOLD[name] if name else None


def of_data(data_dir: Path) -> Gold | None:
    """The gold reward of the task the data stage prepared, if it has one."""
    return named(task_gold_name(data_dir))


def task_gold_name(data_dir: Path) -> str | None:
    return json.loads((data_dir / "task.json").read_text())["gold_reward"]
