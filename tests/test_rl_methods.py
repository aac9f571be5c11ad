"""The registered RL methods (`rlhf/ppo/methods.py`) against numbers worked out by hand."""

from typing import get_args

import pytest
import torch

from rlhf.stages.rl.config import GrpoStage, LossAggregation, PpoStage, ReinforceStage, RlStage, RlooStage
from rlhf.graph import GRAPH
from rlhf.ppo import algorithm as A
from rlhf.ppo import rollout as rollouts
from rlhf.ppo.methods import AGGREGATIONS, ESTIMATORS, POLICY_LOSSES, Signals

UNIT = {"mean": 0.0, "std": 1.0}


def _signals(rewards, rl, mask=None):
    rewards = torch.tensor(rewards)
    mask = torch.ones(len(rewards), 2) if mask is None else mask
    zero = torch.zeros_like(mask)
    return Signals(scores=rewards, kl=zero, mask=mask, rewards=zero, values=None, beta=0.0, rl=rl,
                   whiten=lambda raw, mask: A.masked_whiten(raw, mask))


def test_every_rl_stage_names_a_registered_estimator_and_policy_loss():
    rl_configs = [stage.config for stage in GRAPH.values() if issubclass(stage.config, RlStage)]
    assert {config.model_fields["estimator"].default for config in rl_configs} <= set(ESTIMATORS)
    assert set(get_args(RlStage.model_fields["policy_loss"].annotation)) == set(POLICY_LOSSES)
    assert set(get_args(LossAggregation)) == set(AGGREGATIONS)


def test_grpo_normalises_each_group_by_its_own_mean_and_unbiased_std():
    signals = _signals([1.0, 2.0, 3.0, 10.0, 10.0, 10.0], GrpoStage(samples_per_prompt=3))  # two prompts, three samples
    advantages, returns = ESTIMATORS["grpo"](signals)
    # group 1: mean 2, unbiased std 1; group 2: all equal, so no signal
    assert advantages[:, 0].tolist() == pytest.approx([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0, 0.0])
    assert returns is None


def test_rloo_subtracts_the_mean_of_the_other_samples():
    two = ESTIMATORS["rloo"](_signals([1.0, 2.0, 6.0, 0.0], RlooStage(samples_per_prompt=2)))[0]
    assert two[:, 0].tolist() == pytest.approx([-1.0, 1.0, 6.0, -6.0])
    # three samples: 3 - (0 + 6) / 2 = 0, 0 - (3 + 6) / 2 = -4.5, 6 - (3 + 0) / 2 = 4.5
    three = ESTIMATORS["rloo"](_signals([3.0, 0.0, 6.0], RlooStage(samples_per_prompt=3)))[0]
    assert three[:, 0].tolist() == pytest.approx([0.0, -4.5, 4.5])


def test_dr_grpo_subtracts_the_group_mean_without_dividing_by_its_std():
    from rlhf.stages.rl.config import DrGrpoStage

    signals = _signals([1.0, 2.0, 6.0, 10.0, 10.0, 10.0], DrGrpoStage(samples_per_prompt=3))
    advantages, returns = ESTIMATORS["dr_grpo"](signals)
    # group 1: mean 3; group 2: all equal, no signal
    assert advantages[:, 0].tolist() == pytest.approx([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]) and returns is None
    assert torch.equal(advantages[:, 0], advantages[:, 1])  # the same advantage on every token
    assert DrGrpoStage().loss_aggregation == "seq_mean_token_sum_norm" and not DrGrpoStage.has_critic


def test_reinforce_plus_plus_discounts_with_its_gamma_then_whitens_over_the_batch():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rollout = rollouts.Rollout(torch.zeros(2, 1), torch.ones(2, 1), torch.zeros_like(mask), mask, torch.ones(2, dtype=torch.bool),
                               torch.tensor([1.0, -2.0]), torch.full((2, 3), -1.0) * mask, torch.full((2, 3), -1.5) * mask, None)
    rollouts.advantages(rollout, UNIT, 0.1, ReinforceStage(gamma=0.5), 1)
    # k1 KL 0.5 per token, penalty -0.05; rewards [-0.05, -0.05, 0.95] and [-0.05, -2.05]
    # returns-to-go, gamma 0.5: [-0.05 - 0.025 + 0.2375, -0.05 + 0.475, 0.95] = [0.1625, 0.425, 0.95]; [-0.05 - 1.025, -2.05]
    returns = torch.tensor([[0.1625, 0.425, 0.95], [-1.075, -2.05, 0.0]])
    mean = returns.sum() / 5
    std = (((returns - mean) ** 2 * mask).sum() / 4) ** 0.5
    assert torch.allclose(rollout.advantages, (returns - mean) / std * mask, atol=1e-5)


@pytest.mark.parametrize("name, expected", [
    # per-token losses [1, 2, 3 | 4, pad]: 5 real tokens
    ("token_mean", (1 + 2 + 3 + 4) / 4),
    ("seq_mean_token_mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),
    ("seq_mean_token_sum_norm", ((1 + 2 + 3) / 10 + 4 / 10) / 2),  # the constant normaliser: max_new_tokens 10
])
def test_each_loss_aggregation_by_hand(name, expected):
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    aggregation = AGGREGATIONS[name]
    assert aggregation.reduce(values, mask, 10).item() == pytest.approx(expected)
    # a micro-batch weighs in by its share of the units: the parts add up to the whole
    units = aggregation.units(mask)
    parts = sum(aggregation.reduce(values[i : i + 1], mask[i : i + 1], 10) * units[i] / units.sum() for i in range(2))
    assert parts.item() == pytest.approx(expected)


def test_ppo_stage_is_the_one_with_a_critic():
    assert PpoStage.has_critic and not any(c.has_critic for c in (GrpoStage, RlooStage, ReinforceStage))
