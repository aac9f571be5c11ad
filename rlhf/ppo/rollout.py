"""Rollouts: sample responses, score them, and turn scores into advantages by the stage's estimator.

Each worker rolls out its shard of the global prompt batch, `samples_per_prompt`
responses per prompt, consecutive, so a prompt's group never spans workers.
Statistics over the whole batch (the whitening of GAE and REINFORCE++) sum
moments over workers, so any worker count computes what one worker would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rlhf import generation
from rlhf.stages.rl.config import RlStage
from rlhf.generation import render
from rlhf.ppo import algorithm as A
from rlhf.ppo.methods import ESTIMATORS, Signals
from rlhf.ppo.roles import Roles, response_logits


@dataclass
class Rollout:
    """One worker's batch: token ids and everything computed from them before the update."""

    query: torch.Tensor  # [b, P] left-padded prompt ids
    query_mask: torch.Tensor
    response: torch.Tensor  # [b, R]
    mask: torch.Tensor  # [b, R] response tokens up to and including EOS
    ended: torch.Tensor
    scores: torch.Tensor | None  # raw reward-model scores
    logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor | None  # the critic's, PPO only
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None  # the critic's targets, PPO only


class PromptSampler:
    """Deterministic epochs of shuffled prompts; its position is part of a checkpoint."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed, self.position = count, seed, 0

    def take(self, n: int) -> list[int]:
        indices = []
        for _ in range(n):
            epoch, offset = divmod(self.position, self.count)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
            indices.append(int(order[offset]))
            self.position += 1
        return indices


@torch.no_grad()
def generate(policy, tokenizer, prompts, sampling, device, repeats: int = 1):
    """`repeats` responses to each prompt, consecutive: prompt ids and mask (a row per response), response ids as
    wide as the longest response, the response mask (through EOS), and whether each ended. Generation stops once
    every response has ended, so scoring and training never compute positions past the longest one."""
    policy.eval()
    texts = [render(tokenizer, p) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    response = generation.generate(policy, batch, sampling, repeats)
    mask, ended = A.response_mask(response, tokenizer.eos_token_id)
    return batch["input_ids"].repeat_interleave(repeats, 0), batch["attention_mask"].repeat_interleave(repeats, 0), response, mask, ended


@torch.no_grad()
def score(roles: Roles, query, query_mask, response, mask, ended, rl: RlStage, repeats: int = 1) -> Rollout:
    """Log-probs of actor and reference and the critic's values; the scores are filled in from the text. Rows in
    runs of `repeats` responses to one prompt, as `generate` returns them, run their prompt once."""
    roles.actor.eval()
    logp = A.token_logprobs(response_logits(roles.actor, query, query_mask, response, repeats), response, rl.temperature)
    with roles.reference():
        ref_logp = A.token_logprobs(response_logits(roles.actor, query, query_mask, response, repeats), response, rl.temperature)
    critic_values = None
    if roles.critic is not None:
        roles.critic.eval()
        critic_values = roles.values(query, query_mask, response) * mask
    return Rollout(query, query_mask, response, mask, ended, None, logp * mask, ref_logp * mask, critic_values)


@torch.no_grad()
def normalisation(roles: Roles, prompts, sampling, precision, rl: RlStage, seed: int, rank: int, world: int) -> dict:
    """Mean and std of the reward model's scores on the starting policy's samples, over all workers.

    The LoRA adapter starts at zero, so the actor is still the starting policy here.
    """
    drawn = np.random.default_rng([seed, 7]).choice(len(prompts), rl.normalisation_samples).tolist()[rank::world]
    totals = torch.zeros(3, dtype=torch.float64, device=roles.actor.device)
    for start in range(0, len(drawn), rl.batch_size):
        batch_prompts = [prompts[i] for i in drawn[start : start + rl.batch_size]]
        with precision():
            response = generate(roles.actor, roles.tokenizer, batch_prompts, sampling, roles.actor.device)[2]
            scores = roles.scores(batch_prompts, generation.decode(roles.tokenizer, response)[0])
        totals += A.masked_moments(scores, torch.ones_like(scores))
    count, total, squares = summed(totals, world).tolist()
    mean = total / count
    std = max(squares / count - mean**2, 0.0) ** 0.5
    return {"mean": mean, "std": std or 1.0, "count": int(count)}


def advantages(rollout: Rollout, normalisation: dict, beta: float, rl: RlStage, world: int):
    """Fill in the rollout's advantages (and the critic's returns) by the stage's registered estimator.

    The KL to the reference is a penalty in the reward unless the stage puts it
    in the loss. Returns (scores, kl, non-score rewards) for the metrics.
    """
    scores = A.normalise_scores(rollout.scores, normalisation["mean"], normalisation["std"], rl.reward_clip)
    scores = A.apply_missing_eos_penalty(scores, rollout.ended, rl.missing_eos_penalty)
    kl = A.kl_estimate(rollout.logp, rollout.ref_logp, rollout.mask, rl.kl.estimator)
    penalty = 0.0 if rl.kl.in_loss else beta
    rewards, non_score = A.per_token_rewards(scores, kl, rollout.mask, penalty)
    signals = Signals(
        scores=scores, kl=kl, mask=rollout.mask, rewards=rewards, values=rollout.values, beta=penalty, rl=rl,
        whiten=lambda raw, mask: A.masked_whiten(raw, mask, summed(A.masked_moments(raw, mask), world)),
    )
    rollout.advantages, rollout.returns = ESTIMATORS[rl.estimator](signals)
    return scores, kl, non_score


def summed(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of `tensor` over all workers (it must live on the process group's device)."""
    if world > 1:
        dist.all_reduce(tensor)
    return tensor
