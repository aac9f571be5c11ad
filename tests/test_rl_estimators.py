"""Advantages through `rollout.advantages`, the whole path of each estimator, against numbers worked out by hand.

A rollout is built by hand (no model): scores, log-probs of policy and reference (the k1 KL is their
difference), the critic's values for PPO, and a mask with responses of different lengths.
"""

import statistics

import pytest
import torch

from rlhf.stages.rl.config import GrpoStage, PpoStage, RlooStage
from rlhf.ppo import rollout as rollouts


def _rollout(scores, kl, mask, values=None) -> rollouts.Rollout:
    """Log-probs masked as `rollout.score` leaves them; `kl` is the k1 estimate logp - ref_logp per token."""
    mask = torch.tensor(mask)
    logp = torch.full(mask.shape, -1.0)
    ref_logp = logp - torch.tensor(kl)
    n = mask.shape[0]
    return rollouts.Rollout(
        query=torch.zeros(n, 1, dtype=torch.long), query_mask=torch.ones(n, 1), response=torch.zeros(mask.shape, dtype=torch.long),
        mask=mask, ended=torch.ones(n, dtype=torch.bool), scores=torch.tensor(scores), logp=logp * mask,
        ref_logp=ref_logp * mask, values=None if values is None else torch.tensor(values),
    )


def test_ppo_gae_with_discount_and_lambda_below_one_whitens_advantages_but_not_the_critics_returns():
    """gamma 0.9 and lambda 0.8 (swapping them changes every number below), two responses of 3 and 2 tokens."""
    ppo = PpoStage(gamma=0.9, lam=0.8, kl={"beta": 0.5, "estimator": "k1"})
    rollout = _rollout(
        scores=[2.5, -1.5],  # normalised by mean 0.5, std 2: 1.0 and -1.0
        kl=[[0.2, 0.4, 0.0], [0.2, 0.2, 0.0]],
        mask=[[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]],
        values=[[0.5, 0.6, 0.7], [0.2, -0.3, 5.0]],  # the 5.0 sits under padding: it must not be bootstrapped from
    )
    scores, kl, non_score = rollouts.advantages(rollout, {"mean": 0.5, "std": 2.0}, 0.5, ppo, 1)
    assert scores.tolist() == pytest.approx([1.0, -1.0])
    # rewards: -0.5 * kl on every token, the normalised score added on the last real one
    assert torch.allclose(non_score, torch.tensor([[-0.1, -0.2, 0.0], [-0.1, -0.1, 0.0]]))
    # row 0, rewards [-0.1, -0.2, 1.0], values [0.5, 0.6, 0.7]; gamma * lambda = 0.72
    #   d2 = 1.0 + 0.9 * 0 - 0.7 = 0.3                  A2 = 0.3
    #   d1 = -0.2 + 0.9 * 0.7 - 0.6 = -0.17             A1 = -0.17 + 0.72 * 0.3 = 0.046
    #   d0 = -0.1 + 0.9 * 0.6 - 0.5 = -0.06             A0 = -0.06 + 0.72 * 0.046 = -0.02688
    # row 1, rewards [-0.1, -0.1 - 1.0, 0], values [0.2, -0.3, 0 (masked)]
    #   d1 = -1.1 + 0.9 * 0 + 0.3 = -0.8                A1 = -0.8
    #   d0 = -0.1 + 0.9 * (-0.3) - 0.2 = -0.57          A0 = -0.57 + 0.72 * (-0.8) = -1.146
    raw = [[-0.02688, 0.046, 0.3], [-1.146, -0.8]]
    # the critic learns returns = un-whitened advantages + values, zero under padding
    assert rollout.returns.tolist()[0] == pytest.approx([-0.02688 + 0.5, 0.046 + 0.6, 0.3 + 0.7], abs=1e-6)
    assert rollout.returns.tolist()[1] == pytest.approx([-1.146 + 0.2, -0.8 - 0.3, 0.0], abs=1e-6)
    # the policy's advantages: whitened over the five real tokens (unbiased std), zero under padding
    real = raw[0] + raw[1]
    mean, std = statistics.mean(real), statistics.stdev(real)
    whitened = [[(a - mean) / std for a in row] for row in raw]
    assert rollout.advantages.tolist()[0] == pytest.approx(whitened[0], abs=1e-5)
    assert rollout.advantages.tolist()[1] == pytest.approx(whitened[1] + [0.0], abs=1e-5)
    assert rollout.advantages[1, 2].item() == 0.0


# six responses, two prompts of three samples each (consecutive), of 4, 2, 3, 1, 4 and 2 tokens
MASK = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0],
        [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
PER_TOKEN_KL = [0.5, 0.25, 0.0, 1.0, 0.5, 0.5]  # each response's k1 KL on every one of its tokens
KL = [[k * m for m in row] for k, row in zip(PER_TOKEN_KL, MASK)]


def _every_real_token(per_response):
    return torch.tensor(per_response).unsqueeze(-1) * torch.tensor(MASK)


def test_rloo_gives_each_response_its_leave_one_out_advantage_on_every_real_token():
    rollout = _rollout(scores=[1.0, 2.0, -0.5, 0.0, 0.0, 3.0], kl=KL, mask=MASK)
    rollouts.advantages(rollout, {"mean": 0.0, "std": 1.0}, 0.2, RlooStage(samples_per_prompt=3), 1)
    # rewards: score - 0.2 * summed KL: 1 - 0.4 = 0.6, 2 - 0.1 = 1.9, -0.5 - 0 = -0.5 | 0 - 0.2, 0 - 0.4, 3 - 0.2 = 2.8
    # minus the mean of the other two: 0.6 - 0.7, 1.9 - 0.05, -0.5 - 1.25 | -0.2 - 1.2, -0.4 - 1.3, 2.8 + 0.3
    expected = _every_real_token([-0.1, 1.85, -1.75, -1.4, -1.7, 3.1])
    assert torch.allclose(rollout.advantages, expected, atol=1e-6), rollout.advantages
    assert rollout.returns is None


def test_grpo_gives_each_response_its_group_normalised_score_on_every_real_token():
    rollout = _rollout(scores=[1.0, 2.0, 3.0, 0.0, 0.0, 3.0], kl=KL, mask=MASK)
    grpo = GrpoStage(samples_per_prompt=3)  # the KL is in the loss, so not in the reward
    rollouts.advantages(rollout, {"mean": 0.0, "std": 1.0}, 0.2, grpo, 1)
    # group 1: mean 2, unbiased std 1; group 2: mean 1, unbiased std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    root3 = 3**0.5 + 1e-6
    expected = _every_real_token([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), -1 / root3, -1 / root3, 2 / root3])
    assert torch.allclose(rollout.advantages, expected, atol=1e-6), rollout.advantages
    assert rollout.returns is None
