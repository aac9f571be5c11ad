"""Two PPO workers (real torch.distributed, gloo) take the step one worker takes on the same rollouts."""

from contextlib import nullcontext
from dataclasses import fields, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf import models
from rlhf.config import PpoStage
from rlhf.ppo import algorithm as A
from rlhf.ppo import worker

PPO = PpoStage(batch_size=4, minibatches=1, epochs=2, max_new_tokens=10)
NORMALISATION = {"mean": 0.3, "std": 2.0}
BETA = 0.05


@pytest.fixture(scope="module")
def setup(tiny_model):
    """One fixed rollout of four responses of different lengths."""
    directory, tokenizer, prompts = tiny_model
    policy, critic = _models(directory, tokenizer)
    sampling = worker.generation.sampling_config(tokenizer, PPO.max_new_tokens, PPO.temperature)
    query, query_mask, response, _, ended = worker._generate(policy, tokenizer, prompts, sampling, PPO, torch.device("cpu"))
    mask = (torch.arange(10) < torch.tensor([[10], [7], [4], [2]])).float()  # unequal tokens per worker: weighting matters
    rollout = worker._score(policy, critic, query, query_mask, response, mask, ended, PPO)
    rollout.scores = torch.tensor([1.5, -0.5, 0.25, 2.0])
    return directory, rollout


def _models(directory, tokenizer=None):
    tokenizer = tokenizer or models.load_tokenizer(directory, padding_side="left")
    torch.manual_seed(0)  # the same LoRA and head initialisation in every process
    policy = worker._policy(directory, PPO, torch.device("cpu"))
    critic = worker._critic(directory, directory, tokenizer, tokenizer, None, PPO, torch.device("cpu"))
    return policy, critic


def _train(directory, rollout: worker.Rollout, world: int):
    """Advantages, then the update; returns (advantages, trained parameters, statistics summed over workers)."""
    policy, critic = _models(directory)
    _, kl, _ = worker._advantages(rollout, NORMALISATION, BETA, PPO, world)
    params = {name: [p for p in model.parameters() if p.requires_grad] for name, model in (("policy", policy), ("critic", critic))}
    optimisers = {name: torch.optim.SGD(p, lr=0.5) for name, p in params.items()}  # Adam would magnify rounding
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for name, o in optimisers.items()}
    stats, _ = worker._update(policy, critic, optimisers, schedulers, params["policy"], params["critic"], rollout, PPO, nullcontext, world)
    stats = worker._over_workers(stats, world, torch.device("cpu"), mean=False)
    return rollout.advantages, [p.detach().clone() for p in params["policy"] + params["critic"]], stats


def _shard(rollout: worker.Rollout, rank: int, world: int) -> worker.Rollout:
    """Rows rank, rank + world, ...: how the driver's batch is split over workers."""
    return replace(rollout, **{f.name: getattr(rollout, f.name)[rank::world] for f in fields(rollout) if getattr(rollout, f.name) is not None})


def _rank(rank: int, world: int, directory, rollout, rendezvous, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.save(_train(directory, _shard(rollout, rank, world), world), f"{results}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_workers_take_the_single_worker_step(setup, tmp_path):
    directory, rollout = setup
    advantages, params, stats = _train(directory, replace(rollout), world=1)

    mp.spawn(_rank, args=(2, directory, rollout, tmp_path / "rendezvous", tmp_path), nprocs=2)
    shards = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]

    for rank, (shard_advantages, shard_params, shard_stats) in enumerate(shards):
        assert torch.allclose(shard_advantages, advantages[rank::2], atol=1e-6)
        for single, distributed in zip(params, shard_params):
            assert torch.allclose(single, distributed, atol=1e-6), (single - distributed).abs().max()
        for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "policy_grad_norm"):
            assert shard_stats[key] == pytest.approx(stats[key], abs=1e-5), key
    untrained = [p for model in _models(directory) for p in model.parameters() if p.requires_grad]
    assert not all(torch.equal(a, b) for a, b in zip(params, untrained))  # the step is real


def test_whitening_over_shards_equals_whitening_the_batch():
    values, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    moments = A.masked_moments(values[0::2], mask[0::2]) + A.masked_moments(values[1::2], mask[1::2])
    whole = A.masked_whiten(values, mask)
    assert torch.allclose(A.masked_whiten(values[1::2], mask[1::2], moments), whole[1::2], atol=1e-6)
    assert not torch.allclose(A.masked_whiten(values[1::2], mask[1::2]), whole[1::2], atol=1e-3)
