"""The registries of the RL methods, by name, as veRL's `register_adv_est` and `register_policy_loss`:
advantage estimators, policy losses and the ways a loss is aggregated over tokens.

A stage's block names one of each (`estimator`, `policy_loss`, `loss_aggregation`);
a new critic-free method is one estimator registered here, its config class and
its YAML block. Every function has a test with numbers worked out by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.ppo import algorithm as A


@dataclass
class Signals:
    """What an estimator turns into advantages: one worker's shard of the scored batch."""

    scores: torch.Tensor  # [b] normalised scores, clipped, missing-EOS penalty applied
    kl: torch.Tensor  # [b, T] per-token KL estimate, zero where `mask` is
    mask: torch.Tensor
    rewards: torch.Tensor  # [b, T] the KL penalty on every token plus the score on the last one
    values: torch.Tensor | None  # the critic's, when the stage has one
    beta: float  # the KL penalty in the reward (0 when the KL is a loss term)
    rl: object  # the stage's block: the estimator's own keys (gamma, lam) and samples_per_prompt
    whiten: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # masked whitening over the whole batch, all workers

    def sequence_rewards(self) -> torch.Tensor:
        return A.sequence_rewards(self.scores, self.kl, self.mask, self.beta)


Estimator = Callable[[Signals], tuple[torch.Tensor, torch.Tensor | None]]  # -> advantages [b, T], critic returns or None
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    def register(estimator: Estimator) -> Estimator:
        ESTIMATORS[name] = estimator
        return estimator

    return register


@register_estimator("gae")
def gae(s: Signals):
    """PPO: GAE from the critic's values, whitened over the batch; the critic learns the returns."""
    raw, returns = A.gae(s.rewards, s.values, s.mask, s.rl.gamma, s.rl.lam)
    return s.whiten(raw, s.mask), returns


@register_estimator("reinforce++")
def reinforce_plus_plus(s: Signals):
    """REINFORCE++ (Hu 2025): discounted returns-to-go of the per-token rewards, whitened over the batch."""
    return s.whiten(A.returns_to_go(s.rewards, s.mask, s.rl.gamma), s.mask), None


def _per_response(advantages: torch.Tensor, s: Signals):
    return advantages.reshape(-1).unsqueeze(-1) * s.mask, None


@register_estimator("grpo")
def grpo(s: Signals):
    """GRPO (Shao et al. 2024): (r - group mean) / (group std + 1e-6), the std unbiased, on every token."""
    groups = s.sequence_rewards().view(-1, s.rl.samples_per_prompt)
    return _per_response((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + 1e-6), s)


@register_estimator("rloo")
def rloo(s: Signals):
    """RLOO (Ahmadian et al. 2024): r minus the mean of the other responses to the same prompt."""
    groups = s.sequence_rewards().view(-1, s.rl.samples_per_prompt)
    return _per_response(groups - (groups.sum(-1, keepdim=True) - groups) / (s.rl.samples_per_prompt - 1), s)


@register_estimator("dr_grpo")
def dr_grpo(s: Signals):
    """Dr. GRPO (Liu et al. 2025): r minus the group mean; without GRPO's division by the group's std, prompts
    whose responses all score alike are not weighed up."""
    groups = s.sequence_rewards().view(-1, s.rl.samples_per_prompt)
    return _per_response(groups - groups.mean(-1, keepdim=True), s)


# ---------------------------------------------------------------- policy losses


@dataclass
class PolicyLoss:
    per_token: torch.Tensor  # [b, T], aggregated by the stage's `loss_aggregation`
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_var: torch.Tensor


Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], PolicyLoss]
POLICY_LOSSES: dict[str, Loss] = {}


def register_policy_loss(name: str) -> Callable[[Loss], Loss]:
    def register(loss: Loss) -> Loss:
        POLICY_LOSSES[name] = loss
        return loss

    return register


@register_policy_loss("clip")
def clipped_surrogate(logp, old_logp, advantages, mask, clip: float) -> PolicyLoss:
    """PPO's clipped surrogate per token: max(-A r, -A clip(r, 1 - c, 1 + c))."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    with torch.no_grad():
        stats = dict(
            clip_fraction=A.masked_mean((clipped > unclipped).float(), mask),
            approx_kl=0.5 * A.masked_mean(log_ratio**2, mask),
            ratio_mean=A.masked_mean(ratio, mask),
            ratio_var=A.masked_var(ratio, mask),
        )
    return PolicyLoss(per_token=torch.max(unclipped, clipped), **stats)


# ---------------------------------------------------------------- loss aggregation


@dataclass(frozen=True)
class Aggregation:
    """How per-token losses become one number: `reduce` over a micro-batch, which then weighs in by its share of
    the minibatch's `units` (over all workers), so any micro-batch size or worker count takes the same step."""

    reduce: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # per-token values, mask, max_new_tokens
    units: Callable[[torch.Tensor], torch.Tensor]  # mask [b, T] -> [b]: what each response counts for


AGGREGATIONS: dict[str, Aggregation] = {}


def register_aggregation(name: str, aggregation: Aggregation) -> None:
    AGGREGATIONS[name] = aggregation


# DAPO (Yu et al. 2025): every token of the minibatch counts the same, so long responses weigh more
register_aggregation("token_mean", Aggregation(
    reduce=lambda values, mask, _: A.masked_mean(values, mask),
    units=lambda mask: mask.sum(-1),
))
# GRPO as Shao et al. wrote it: each response's token mean, then the mean over responses
register_aggregation("seq_mean_token_mean", Aggregation(
    reduce=lambda values, mask, _: A.masked_mean(values, mask, dim=-1).mean(),
    units=lambda mask: torch.ones_like(mask[:, 0]),
))
# Dr. GRPO (Liu et al. 2025): each response's token sum over a constant (the length limit), then the mean over responses
register_aggregation("seq_mean_token_sum_norm", Aggregation(
    reduce=lambda values, mask, length: ((values * mask).sum(-1) / length).mean(),
    units=lambda mask: torch.ones_like(mask[:, 0]),
))
