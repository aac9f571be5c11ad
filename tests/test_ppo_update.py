"""The PPO update on a tiny model: micro-batches accumulate exactly the minibatch's gradient step."""

from contextlib import nullcontext

import pytest
import torch

from rlhf.config import PpoStage
from rlhf.ppo import worker


def _step(tiny_model, micro_batch_size):
    directory, tokenizer, prompts = tiny_model
    ppo = PpoStage(batch_size=4, minibatches=1, epochs=1, max_new_tokens=10, micro_batch_size=micro_batch_size)
    torch.manual_seed(0)
    policy = worker._policy(directory, ppo, torch.device("cpu"))
    critic = worker._critic(directory, directory, tokenizer, tokenizer, None, ppo, torch.device("cpu"))
    sampling = worker.generation.sampling_config(tokenizer, ppo.max_new_tokens, ppo.temperature)
    query, query_mask, response, _, ended = worker._generate(policy, tokenizer, prompts, sampling, ppo, torch.device("cpu"))
    mask = (torch.arange(10) < torch.tensor([[10], [7], [4], [2]])).float()  # lengths differ: token weighting matters
    rollout = worker._score(policy, critic, query, query_mask, response, mask, ended, ppo)
    rollout.advantages = torch.linspace(-1, 1, mask.numel()).reshape(mask.shape) * mask
    rollout.returns = rollout.values + rollout.advantages
    params = {name: [p for p in model.parameters() if p.requires_grad] for name, model in (("policy", policy), ("critic", critic))}
    optimisers = {name: torch.optim.SGD(p, lr=0.1) for name, p in params.items()}
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for name, o in optimisers.items()}
    stats, _ = worker._update(policy, critic, optimisers, schedulers, params["policy"], params["critic"], rollout, ppo, nullcontext, 1)
    return [p.detach().clone() for p in params["policy"] + params["critic"]], stats


def test_micro_batches_take_the_same_step_as_the_whole_minibatch(tiny_model):
    whole, whole_stats = _step(tiny_model, None)
    micro, micro_stats = _step(tiny_model, 1)
    for a, b in zip(whole, micro):
        assert torch.allclose(a, b, atol=1e-6)
    assert micro_stats["policy_loss"] == pytest.approx(whole_stats["policy_loss"].item(), abs=1e-6)
