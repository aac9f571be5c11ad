from collections import Counter

import pytest

from rlhf.synthetic_reviews import BEST_GOLD, generate_examples, gold_reward, prompt_item


def test_gold_reward_by_hand():
    prompt = "Write a review of the lamp."
    # sentiment +1, item named +0.25
    assert gold_reward(prompt, "The lamp is great. Overall it feels superb.") == pytest.approx(BEST_GOLD)
    # sentiment (1-1)/2 = 0, item named +0.25
    assert gold_reward(prompt, "The lamp is great. The design looks awful.") == pytest.approx(0.25)
    # sentiment -1, item not named -0.25
    assert gold_reward(prompt, "Overall it feels terrible. The design looks bad.") == pytest.approx(-1.25)
    # 2 words: -0.25 length, 1 of 1 sentence off-template: -1, sentiment +1, no item -0.25
    assert gold_reward(prompt, "great great") == pytest.approx(-0.5)
    # repeated sentence: -0.25 once
    assert gold_reward(prompt, "The lamp is great. The lamp is great.") == pytest.approx(1.0)
    # half the sentences off-template: -0.5; sentiment +1; item named
    assert gold_reward(prompt, "The lamp is great. I like turtles a lot.") == pytest.approx(0.75)
    assert gold_reward(prompt, "") == pytest.approx(-1.5)


def test_item_of_prompt_and_wrong_item_does_not_count():
    assert prompt_item("Review the mug.") == "mug"
    assert gold_reward("Review the mug.", "The lamp is great. Overall it feels superb.") == pytest.approx(0.75)


def test_generator_is_seeded_and_mostly_not_positive():
    first = generate_examples(4000, 0.25, seed=3)
    assert first == generate_examples(4000, 0.25, seed=3)
    assert first != generate_examples(4000, 0.25, seed=4)
    moods = Counter(e["mood"] for e in first)
    assert 0.21 < moods["positive"] / 4000 < 0.29
    golds = [gold_reward(e["prompt"], e["completion"]) for e in first]
    assert sum(golds) / len(golds) < 0.2  # room above for RLHF to climb to ~1.25
    assert all(g > -2 for g in golds)
