"""The update on a tiny model: micro-batches accumulate exactly the minibatch's gradient step."""

from contextlib import nullcontext

import pytest
import torch

from rlhf import generation, models
from rlhf.blocks import Lora
from rlhf.stages.rl.config import GrpoStage, PpoStage
from rlhf.ppo import algorithm as A
from rlhf.ppo import roles as R
from rlhf.ppo import rollout as rollouts
from rlhf.ppo.update import update

CPU = torch.device("cpu")


def _step(tiny_model, rl, micro_batch_size):
    directory, _, prompts = tiny_model
    rl = rl.model_copy(update={"micro_batch_size": micro_batch_size})
    torch.manual_seed(0)
    roles = R.load(directory, directory, rl, None, CPU)
    sampling = generation.sampling_config(roles.tokenizer, rl.max_new_tokens, rl.temperature)
    query, query_mask, response, _, ended = rollouts.generate(roles.actor, roles.tokenizer, prompts, sampling, CPU)
    mask = (torch.arange(10) < torch.tensor([[10], [7], [4], [2]])).float()  # lengths differ: token weighting matters
    rollout = rollouts.score(roles, query, query_mask, response, mask, ended, rl)
    rollout.advantages = torch.linspace(-1, 1, mask.numel()).reshape(mask.shape) * mask
    if roles.critic is not None:
        rollout.returns = rollout.values + rollout.advantages
    params = roles.trainable()
    optimisers = {name: torch.optim.SGD(p, lr=0.1) for name, p in params.items()}
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for name, o in optimisers.items()}
    stats, _ = update(roles, optimisers, schedulers, rollout, rl, 0.1, nullcontext, 1)
    return [p.detach().clone() for group in params.values() for p in group], stats


@pytest.mark.parametrize("rl", [
    PpoStage(batch_size=4, minibatches=1, epochs=1, max_new_tokens=10),
    GrpoStage(batch_size=4, minibatches=1, epochs=1, max_new_tokens=10),  # no critic, the KL in the loss
    GrpoStage(batch_size=4, minibatches=1, epochs=1, max_new_tokens=10, loss_aggregation="seq_mean_token_mean"),
    GrpoStage(batch_size=4, minibatches=1, epochs=1, max_new_tokens=10, loss_aggregation="seq_mean_token_sum_norm"),
], ids=["ppo", "grpo", "grpo-seq-mean", "grpo-dr"])
def test_micro_batches_take_the_same_step_as_the_whole_minibatch(tiny_model, rl):
    whole, whole_stats = _step(tiny_model, rl, None)
    micro, micro_stats = _step(tiny_model, rl, 1)
    for a, b in zip(whole, micro):
        assert torch.allclose(a, b, atol=1e-6)
    assert micro_stats["policy_loss"] == pytest.approx(whole_stats["policy_loss"].item(), abs=1e-6)
    assert ("value_loss" in whole_stats) == rl.has_critic and ("kl_loss" in whole_stats) == rl.kl.in_loss


def test_a_critic_free_stage_loads_no_critic(tiny_model):
    directory, _, _ = tiny_model
    roles = R.load(directory, directory, GrpoStage(), None, CPU)
    assert roles.critic is None and list(roles.trainable()) == ["policy"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_lora_critic_over_the_reward_model_is_the_reward_model_with_its_adapter_off(tiny_model, precision, tmp_path):
    directory, tokenizer, prompts = tiny_model
    torch.manual_seed(1)  # a saved reward model: its score head is part of it
    models.load_reward_model(directory).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    rl = PpoStage(precision=precision)
    torch.manual_seed(0)
    shared = R.load(directory, tmp_path, rl, Lora(), CPU)
    separate = R.load(directory, tmp_path, rl, None, CPU)
    assert shared.reward is None and separate.reward is not None  # one base in memory instead of two
    texts = ["I loved it.", "It was awful.", "Fine, I suppose.", "The best day ever!"]
    want = separate.scores(prompts, texts)

    shared.on_score_scale({"mean": 0.5, "std": 4.0, "count": 8}, fresh=True)
    with torch.no_grad():  # as training moves the critic: its adapter and its copy of the score head
        for param in shared.trainable()["critic"]:
            param.add_(torch.linspace(-0.3, 0.3, param.numel()).view_as(param))
    assert torch.allclose(shared.scores(prompts, texts), want, atol=1e-5 if precision == "fp32" else 0.05)
    query = shared.tokenizer([generation.render(shared.tokenizer, p) for p in prompts], return_tensors="pt", padding=True)
    response = torch.randint(5, 50, (len(prompts), 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        values = shared.values(query.input_ids, query.attention_mask, response)
        with shared.critic.disable_adapter():
            untrained = R.values(shared.critic, query.input_ids, query.attention_mask, response)
    assert (values - untrained).abs().max() > 0.1  # the values come from the trained critic, not the reward model


def _rollout(scores, logp, ref_logp, mask):
    n = len(scores)
    return rollouts.Rollout(torch.zeros(n, 1), torch.ones(n, 1), torch.zeros_like(mask), mask, torch.ones(n, dtype=torch.bool),
                            torch.tensor(scores), logp * mask, ref_logp * mask, None)


def test_each_estimator_turns_scores_into_its_advantages():
    from rlhf.stages.rl.config import ReinforceStage, RlooStage

    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    logp, ref_logp = torch.full((4, 2), -1.0), torch.full((4, 2), -1.5)  # k1 KL of 0.5 per token
    unit = {"mean": 0.0, "std": 1.0}

    grpo = _rollout([1.0, 3.0, 0.0, 0.0], logp, ref_logp, mask)  # KL in the loss: scores alone
    rollouts.advantages(grpo, unit, 0.1, GrpoStage(samples_per_prompt=2, kl={"in_loss": True}), 1)
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (2**0.5 + 1e-6)
    assert torch.allclose(grpo.advantages, expected.unsqueeze(-1) * mask)

    rloo = _rollout([1.0, 3.0, 0.0, 0.0], logp, ref_logp, mask)  # rewards 1 - 0.1, 3 - 0.05, 0 - 0.1, 0 - 0.1
    rollouts.advantages(rloo, unit, 0.1, RlooStage(samples_per_prompt=2), 1)
    assert torch.allclose(rloo.advantages[:, 0], torch.tensor([-2.05, 2.05, 0.0, 0.0]))

    reinforce = _rollout([1.0, 3.0, 0.0, 0.0], logp, ref_logp, mask)
    rollouts.advantages(reinforce, unit, 0.1, ReinforceStage(), 1)
    returns = torch.tensor([[0.9, 0.95], [2.95, 0.0], [-0.1, -0.05], [-0.1, -0.05]])
    assert torch.allclose(reinforce.advantages, A.masked_whiten(returns, mask), atol=1e-6)
    assert reinforce.returns is None and grpo.returns is None
