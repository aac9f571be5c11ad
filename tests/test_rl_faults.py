"""Faults the RL engine had, each pinned by a test that failed before its fix."""

import json
from contextlib import nullcontext
import math

import mlflow
import pytest
import torch

from rlhf import generation
from rlhf.blocks import Lora
from rlhf.cluster import RayConfig
from rlhf.config import load_pipeline
from rlhf.stages.rl.config import PpoStage, RlooStage
from rlhf.errors import InputError
from rlhf.ppo import algorithm as A
from rlhf.ppo import driver
from rlhf.ppo.methods import AGGREGATIONS
from rlhf.ppo import roles as R
from rlhf.ppo import rollout as rollouts
from rlhf.ppo.update import update
from rlhf.lifecycle import stage_fingerprint

CPU = torch.device("cpu")
HERE = RayConfig(num_workers=1, cpus_per_worker=1)


def _run(directory, prompts, rl, storage, store):
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    run = mlflow.MlflowClient().create_run("0")
    final = driver.run(
        "rl", rl, HERE, name="rl-test", storage=storage, seed=0, policy_model=directory, reward_model=directory,
        critic_lora=None, prompts=prompts, gold=None, mlflow_uri=mlflow.get_tracking_uri(), mlflow_run_id=run.info.run_id,
    )
    return json.loads((final / "history.json").read_text())


def test_k3_kl_loss_and_its_gradient_stay_finite_with_a_wild_log_prob_under_padding():
    # after EOS the reference log-probs are stored masked to 0 while the live ones can be anything
    logp = torch.tensor([[-1.0, -2.0, -95.0]], requires_grad=True)
    ref, mask = torch.tensor([[-1.5, -2.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    loss = AGGREGATIONS["token_mean"].reduce(A.kl_estimate(logp, ref, mask, "k3"), mask, 3)  # as the update takes it
    loss.backward()
    r = math.exp(-0.5)  # p_ref / p on the first token
    assert loss.item() == pytest.approx(((r - 1) - math.log(r)) / 2)
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0


def test_the_adaptive_kl_controller_counts_responses_not_prompts(tiny_model, tmp_path):
    directory, _, prompts = tiny_model
    rloo = RlooStage(iterations=2, batch_size=2, samples_per_prompt=2, minibatches=1, epochs=1, max_new_tokens=6,
                     normalisation_samples=4, kl={"beta": 0.1, "target": 1.0, "horizon": 10})
    first, second = _run(directory, prompts, rloo, tmp_path / "ray", tmp_path / "mlflow.db")
    error = min(max(first["kl"] / 1.0 - 1.0, -0.2), 0.2)
    assert error != 0
    # 2 prompts x 2 samples: n = 4 responses
    assert second["beta"] == pytest.approx(0.1 * (1 + error * 4 / 10), rel=1e-9)


def test_dropout_is_off_in_every_role_so_the_first_ratio_is_one(tiny_model, tmp_path):
    directory, tokenizer, prompts = tiny_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, attention_dropout=0.5)  # as GPT-2-like models ship
    model.save_pretrained(tmp_path / "dropout")
    tokenizer.save_pretrained(tmp_path / "dropout")
    ppo = PpoStage(batch_size=4, minibatches=1, epochs=1, max_new_tokens=8, lora=Lora(dropout=0.3))
    torch.manual_seed(0)
    roles = R.load(tmp_path / "dropout", tmp_path / "dropout", ppo, None, CPU)
    sampling = generation.sampling_config(roles.tokenizer, ppo.max_new_tokens, ppo.temperature)
    query, query_mask, response, mask, ended = rollouts.generate(roles.actor, roles.tokenizer, prompts, sampling, CPU)
    rollout = rollouts.score(roles, query, query_mask, response, mask, ended, ppo)
    rollout.advantages = torch.ones_like(mask) * mask
    rollout.returns = rollout.values + rollout.advantages
    params = roles.trainable()
    optimisers = {name: torch.optim.SGD(p, lr=0.0) for name, p in params.items()}
    schedulers = {name: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0) for name, o in optimisers.items()}
    stats, _ = update(roles, optimisers, schedulers, rollout, ppo, 0.0, nullcontext, 1)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-10)
    assert stats["policy_clip_fraction"].item() == 0.0


@pytest.mark.parametrize("critic_lora", [None, Lora()], ids=["full", "lora"])
def test_the_critic_starts_on_the_scale_of_the_normalised_scores(tiny_model, critic_lora):
    directory, _, prompts = tiny_model
    ppo = PpoStage(batch_size=4, max_new_tokens=8)
    torch.manual_seed(0)
    roles = R.load(directory, directory, ppo, critic_lora, CPU)
    sampling = generation.sampling_config(roles.tokenizer, ppo.max_new_tokens, ppo.temperature)
    query, query_mask, response, _, _ = rollouts.generate(roles.actor, roles.tokenizer, prompts, sampling, CPU)
    raw = roles.values(query, query_mask, response)
    roles.on_score_scale({"mean": 0.3, "std": 2.0}, fresh=True)
    assert torch.allclose(roles.values(query, query_mask, response), (raw - 0.3) / 2.0, atol=1e-6)
    roles.on_score_scale({"mean": 0.3, "std": 2.0}, fresh=False)  # a resumed run's weights were restored scaled
    assert torch.allclose(roles.values(query, query_mask, response), (raw - 0.3) / 2.0, atol=1e-6)


def test_an_rl_stage_names_its_own_max_prompt_tokens(tiny_model):
    from rlhf.stages.rl.recipe import _fitting

    directory, _, prompts = tiny_model
    with pytest.raises(InputError, match=r"^stages\.grpo\.max_prompt_tokens: "):
        _fitting(prompts, directory, 1, "grpo")


def test_the_worker_count_is_part_of_an_rl_stage_fingerprint(project):
    fingerprints = set()
    for workers in (1, 2, 4):
        _, pipeline = load_pipeline(project / "pipelines.yaml", "tiny-ppo", [f"ray.num_workers={workers}"])
        fingerprints.add(stage_fingerprint(pipeline, "ppo", {}))
    assert len(fingerprints) == 3  # a changed worker count starts afresh, in a new stage directory


def test_resuming_a_checkpoint_of_another_worker_count_is_a_clear_error(tiny_model, tmp_path):
    directory, _, prompts = tiny_model
    rloo = RlooStage(iterations=2, batch_size=2, samples_per_prompt=2, minibatches=1, epochs=1, max_new_tokens=6,
                     normalisation_samples=4, checkpoint_every=1)
    _run(directory, prompts, rloo, tmp_path / "ray", tmp_path / "mlflow.db")
    [newest] = sorted((tmp_path / "ray" / "rl-test").glob("checkpoint_*"))[-1:]
    state = torch.load(newest / "state.pt", weights_only=False)
    state["rng"] = state["rng"] * 2  # as two workers write it
    torch.save(state, newest / "state.pt")
    with pytest.raises(InputError, match="written by 2 workers, resumed by 1"):
        _run(directory, prompts, rloo.model_copy(update={"iterations": 3}), tmp_path / "ray", tmp_path / "mlflow.db")
