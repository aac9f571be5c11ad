import pytest

from rlhf import evaluation


def test_win_rate_counts_ties_as_half():
    assert evaluation.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)


def test_distinct_n():
    texts = ["the lamp is great", "the lamp is bad"]
    assert evaluation.distinct_n(texts, 1) == pytest.approx(5 / 8)  # the, lamp, is, great, bad
    assert evaluation.distinct_n(texts, 2) == pytest.approx(4 / 6)  # the lamp, lamp is, is great, is bad
    assert evaluation.distinct_n(["one"], 2) == 0.0


def test_reward_hacking_fires_when_the_reward_model_rises_and_gold_falls():
    assert evaluation.reward_hacking(score_gain=1.8, gold_gain=-0.4, min_score_gain=1.0, max_gold_gain=0.1)
    assert not evaluation.reward_hacking(score_gain=1.8, gold_gain=0.6, min_score_gain=1.0, max_gold_gain=0.1)
    assert not evaluation.reward_hacking(score_gain=0.3, gold_gain=-0.4, min_score_gain=1.0, max_gold_gain=0.1)
