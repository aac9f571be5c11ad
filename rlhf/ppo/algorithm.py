"""PPO and its critic-free relatives for RLHF, the maths only: tensors in, tensors out. No models, no distribution.

Shapes: `[batch, response_len]` for per-token quantities; `mask` is 1.0 on
real response tokens (up to and including EOS) and 0.0 after it and under
padding. Conventions follow the public reference implementations
(lm-human-preferences, TRL's former PPOTrainer, OpenRLHF); see
`shared/ppo-notes.md` for the list this file implements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return ((values - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1)


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares] of the masked entries, in float64: summed over workers, they describe the whole batch."""
    values, mask = values.double(), mask.double()
    return torch.stack([mask.sum(), (values * mask).sum(), (values**2 * mask).sum()])


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, moments: torch.Tensor | None = None) -> torch.Tensor:
    """(values - mean) / std over the masked entries (unbiased variance), zero elsewhere.

    `moments` (from `masked_moments`, summed over every worker's shard) whiten
    a shard with the statistics of the whole batch.
    """
    count, total, squares = (masked_moments(values, mask) if moments is None else moments).tolist()
    mean = total / max(count, 1.0)
    var = max(squares - count * mean**2, 0.0) / max(count - 1, 1.0)
    return (values - mean) * (var + 1e-8) ** -0.5 * mask


# ---------------------------------------------------------------- log-probabilities


# A block of the vocabulary-wide work holds at most this many fp32 elements (64 MiB): the log-softmax over
# [batch, tokens, vocab] is never materialised, which on a 49k vocabulary is most of an RL step's activations.
CHUNK_ELEMENTS = 1 << 24


def _blocks(logits: torch.Tensor) -> list[torch.Tensor]:
    """Views of `logits` along the token axis, each at most CHUNK_ELEMENTS (one token position at the least)."""
    batch, tokens, vocab = logits.shape
    return list(logits.split(max(1, CHUNK_ELEMENTS // max(1, batch * vocab)), dim=1)) if tokens else [logits]


def _logsumexp(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.cat([torch.logsumexp(block.float() / temperature, dim=-1) for block in _blocks(logits)], dim=1)


class _TokenLogprobs(torch.autograd.Function):
    """Keeps the logits and each position's log-normaliser; the backward rebuilds the softmax block by block
    and writes the gradient in the logits' own dtype."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        normaliser = _logsumexp(logits, temperature)
        picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1).float() / temperature
        ctx.save_for_backward(logits, tokens, normaliser)
        ctx.temperature = temperature
        return picked - normaliser

    @staticmethod
    def backward(ctx, grad):
        logits, tokens, normaliser = ctx.saved_tensors
        temperature = ctx.temperature
        grad_logits = torch.empty_like(logits)
        start = 0
        for block in _blocks(logits):
            end = start + block.shape[1]
            scale = grad[:, start:end, None].float() / temperature
            part = torch.exp(block.float() / temperature - normaliser[:, start:end, None]).mul_(-scale)
            part.scatter_add_(-1, tokens[:, start:end, None], scale)
            grad_logits[:, start:end] = part
            start = end
        return grad_logits, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature), in fp32: the one sampling distribution used everywhere."""
    return _TokenLogprobs.apply(logits, tokens, temperature)


@torch.no_grad()
def entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position, in fp32; a statistic, so no gradient."""
    parts = []
    for block in _blocks(logits):
        logp = block.float() / temperature
        logp -= torch.logsumexp(logp, dim=-1, keepdim=True)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------- rewards


def normalise_scores(scores: torch.Tensor, mean: float, std: float, clip: float | None) -> torch.Tensor:
    """Reward-model scores mapped to mean 0, std 1 on reference-policy samples; optionally clipped."""
    normalised = (scores - mean) / std
    return normalised.clamp(-clip, clip) if clip is not None else normalised


def apply_missing_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """A response cut off at the length limit gets `penalty` instead of its score."""
    if penalty is None:
        return scores
    return torch.where(ended, scores, torch.full_like(scores, penalty))


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate from samples of the policy, zero where `mask` is.

    k1 = log r (unbiased, can be negative per token); k3 = (r - 1) - log r with
    r = p_ref / p_policy (unbiased and always >= 0). The log-ratio is masked
    before k3's exponential: a padding position's log-prob can be anything
    (below about -88 its exponential overflows, and inf * 0 is NaN), and it is
    clamped to +-10 there, as OpenRLHF does, so one wild token cannot swamp a loss.
    """
    log_ratio = (logp - ref_logp) * mask
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-10.0, 10.0)
        return (torch.expm1(-log_ratio) + log_ratio) * mask
    raise ValueError(f"unknown KL estimator {estimator!r}")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`-beta * kl` on every response token plus the score on the last real token.

    Returns (rewards, non_score_rewards), both zero where `mask` is zero.
    """
    non_score = -beta * kl * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    rewards = non_score + last.float() * scores.unsqueeze(-1)
    return rewards, non_score


class KLController:
    """Fixed or adaptive KL coefficient (Ziegler et al. 2019).

    Adaptive: beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon, never below min_beta.
    """

    def __init__(self, beta: float, target: float | None = None, horizon: int = 10000, min_beta: float = 0.0):
        self.beta, self.target, self.horizon, self.min_beta = beta, target, horizon, min_beta

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.beta = max(self.min_beta, self.beta * (1.0 + error * n_steps / self.horizon))

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon, "min_beta": self.min_beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.target, self.horizon, self.min_beta = state["beta"], state["target"], state["horizon"], state["min_beta"]


# ---------------------------------------------------------------- advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens, right to left.

    Values and rewards past EOS are zeroed first, so the step after the last
    token bootstraps from 0. Returns (advantages, returns), both masked.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """One reward per response: the score minus `beta` times the response's summed KL."""
    return scores - beta * (kl * mask).sum(-1)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted sum of the rewards from each response token to the end (REINFORCE), masked."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


# ---------------------------------------------------------------- losses


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max of unclipped and clipped squared error; returns (loss, clip fraction)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clip_fraction.detach()


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1.0 on tokens up to and including the first EOS, whether each response has an EOS)."""
    is_eos = responses == eos_id
    ended = is_eos.any(-1)
    last = torch.where(ended, is_eos.int().argmax(-1), responses.shape[1] - 1)
    positions = torch.arange(responses.shape[1], device=responses.device)
    return (positions.unsqueeze(0) <= last.unsqueeze(-1)).float(), ended
