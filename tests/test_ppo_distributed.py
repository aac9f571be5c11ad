"""Two workers (real torch.distributed, gloo) take the step one worker takes on the same rollouts."""

from contextlib import nullcontext
from dataclasses import fields, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf import generation
from rlhf.stages.rl.config import PpoStage, ReinforceStage
from rlhf.ppo import algorithm as A
from rlhf.ppo import roles as R
from rlhf.ppo import rollout as rollouts
from rlhf.ppo.update import over_workers, update

PPO = PpoStage(batch_size=4, minibatches=1, epochs=2, max_new_tokens=10)
NORMALISATION = {"mean": 0.3, "std": 2.0}
BETA = 0.05


CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tiny_model):
    """One fixed rollout of four responses of different lengths."""
    directory, _, prompts = tiny_model
    roles = _roles(directory, PPO)
    sampling = generation.sampling_config(roles.tokenizer, PPO.max_new_tokens, PPO.temperature)
    query, query_mask, response, _, ended = rollouts.generate(roles.actor, roles.tokenizer, prompts, sampling, CPU)
    mask = (torch.arange(10) < torch.tensor([[10], [7], [4], [2]])).float()  # unequal tokens per worker: weighting matters
    rollout = rollouts.score(roles, query, query_mask, response, mask, ended, PPO)
    rollout.scores = torch.tensor([1.5, -0.5, 0.25, 2.0])
    return directory, rollout


def _roles(directory, rl):
    torch.manual_seed(0)  # the same LoRA and head initialisation in every process
    return R.load(directory, directory, rl, None, CPU)


def _train(directory, rollout: rollouts.Rollout, world: int, rl=PPO):
    """Advantages, then the update; returns (advantages, trained parameters, statistics summed over workers)."""
    roles = _roles(directory, rl)
    rollouts.advantages(rollout, NORMALISATION, BETA, rl, world)
    params = roles.trainable()
    optimisers = {name: torch.optim.SGD(p, lr=0.5) for name, p in params.items()}  # Adam would magnify rounding
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for name, o in optimisers.items()}
    stats, _ = update(roles, optimisers, schedulers, rollout, rl, BETA, nullcontext, world)
    stats = over_workers(stats, world, CPU, mean=False)
    return rollout.advantages, [p.detach().clone() for group in params.values() for p in group], stats


def _shard(rollout: rollouts.Rollout, rank: int, world: int) -> rollouts.Rollout:
    """Rows rank, rank + world, ...: how the driver's batch is split over workers."""
    return replace(rollout, **{f.name: getattr(rollout, f.name)[rank::world] for f in fields(rollout) if getattr(rollout, f.name) is not None})


def _rank(rank: int, world: int, directory, rollout, rl, rendezvous, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.save(_train(directory, _shard(rollout, rank, world), world, rl), f"{results}/{rank}.pt")
    finally:
        dist.destroy_process_group()


# REINFORCE++ whitens its returns over the whole batch too, with no critic to train
@pytest.mark.parametrize("rl", [PPO, ReinforceStage(batch_size=4, minibatches=1, epochs=2, max_new_tokens=10)], ids=["ppo", "reinforce"])
# two minibatches: two steps per epoch, each minibatch a share of every worker's shard
@pytest.mark.parametrize("minibatches", [
    pytest.param(1, id="1-minibatch"),
    pytest.param(2, id="2-minibatches"),
])
def test_two_workers_take_the_single_worker_step(setup, tmp_path, rl, minibatches):
    directory, rollout = setup
    rl = rl.model_copy(update={"minibatches": minibatches})
    if not rl.has_critic:
        rollout = replace(rollout, values=None)
    advantages, params, stats = _train(directory, replace(rollout), 1, rl)

    mp.spawn(_rank, args=(2, directory, rollout, rl, tmp_path / "rendezvous", tmp_path), nprocs=2)
    shards = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]

    for rank, (shard_advantages, shard_params, shard_stats) in enumerate(shards):
        assert torch.allclose(shard_advantages, advantages[rank::2], atol=1e-6)
        for single, distributed in zip(params, shard_params):
            assert torch.allclose(single, distributed, atol=1e-6), (single - distributed).abs().max()
        for key in ("policy_loss", "entropy", "approx_kl", "policy_grad_norm") + (("value_loss",) if rl.has_critic else ()):
            assert shard_stats[key] == pytest.approx(stats[key], abs=1e-5), key
    untrained = [p for group in _roles(directory, rl).trainable().values() for p in group]
    assert not all(torch.equal(a, b) for a, b in zip(params, untrained))  # the step is real


def test_whitening_over_shards_equals_whitening_the_batch():
    values, mask = torch.randn(6, 5), (torch.rand(6, 5) > 0.3).float()
    moments = A.masked_moments(values[0::2], mask[0::2]) + A.masked_moments(values[1::2], mask[1::2])
    whole = A.masked_whiten(values, mask)
    assert torch.allclose(A.masked_whiten(values[1::2], mask[1::2], moments), whole[1::2], atol=1e-6)
    assert not torch.allclose(A.masked_whiten(values[1::2], mask[1::2]), whole[1::2], atol=1e-3)
