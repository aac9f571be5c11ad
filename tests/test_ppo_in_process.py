"""An RL stage with one CPU worker trains in a process of its own, without Ray, and resumes after a crash to the same numbers."""

import json
import multiprocessing
import os
import signal

import mlflow
import psutil
import pytest

from conftest import wait_for
from rlhf.cluster import RayConfig
from rlhf.stages.rl.config import GrpoStage, PpoStage
from rlhf.ppo import driver

PPO = PpoStage(iterations=40, batch_size=4, minibatches=2, epochs=2, max_new_tokens=10, normalisation_samples=4, checkpoint_every=2)
# critic-free, two samples per prompt, the KL in the loss: 8 responses per iteration
GRPO = GrpoStage(iterations=20, batch_size=4, samples_per_prompt=2, minibatches=2, epochs=2, max_new_tokens=10,
                 normalisation_samples=4, checkpoint_every=2)
HERE = RayConfig(num_workers=1, cpus_per_worker=1)


def _run(stage, rl, directory, prompts, storage, store):
    """The stage's loop as `tasks/rl.py` calls it, logging to a fresh MLflow run; returns the history."""
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    run = mlflow.MlflowClient().create_run("0")
    final = driver.run(
        stage, rl, HERE, name=f"{stage}-test", storage=storage, seed=0, policy_model=directory, reward_model=directory,
        critic_lora=None, prompts=prompts, gold="synthetic_reviews", mlflow_uri=mlflow.get_tracking_uri(),
        mlflow_run_id=run.info.run_id,
    )
    return json.loads((final / "history.json").read_text())


@pytest.mark.parametrize(("stage", "rl"), [("ppo", PPO), ("grpo", GRPO)], ids=["ppo", "grpo"])
def test_a_crash_resumes_from_the_newest_whole_checkpoint_to_the_same_history(tiny_model, tmp_path, stage, rl):
    directory, _, prompts = tiny_model
    last = rl.iterations
    straight = _run(stage, rl, directory, prompts, tmp_path / "straight", tmp_path / "straight.db")
    assert [h["iteration"] for h in straight] == list(range(1, last + 1))
    assert sorted(p.name for p in (tmp_path / "straight" / f"{stage}-test").iterdir()) == [
        f"checkpoint_{last - 2:06d}", f"checkpoint_{last:06d}"]

    storage = tmp_path / "crashed"
    crashing = multiprocessing.get_context("spawn").Process(
        target=_run, args=(stage, rl, directory, prompts, storage, tmp_path / "crashed.db"))
    crashing.start()
    wait_for(lambda: (storage / f"{stage}-test" / "checkpoint_000004").exists() or not crashing.is_alive(), 300, "a checkpoint")
    assert crashing.is_alive(), "the run ended before it could be killed"
    [worker] = psutil.Process(crashing.pid).children()  # the loop's own process
    os.kill(crashing.pid, signal.SIGKILL)
    crashing.join()
    worker.wait(timeout=30)  # it dies with the stage that started it: no orphan trains on
    (storage / f"{stage}-test" / f".partial-{last}").mkdir()  # as a crash in the middle of writing one leaves it

    resumed = _run(stage, rl, directory, prompts, storage, tmp_path / "crashed.db")
    assert 4 <= max(h["restored_from"] for h in resumed) < last
    assert len(resumed) == len(straight)
    # the critic's loss for PPO; GRPO's KL term in its loss
    keys = ("policy_loss", "score", "kl", "reward_total", "gold") + (("value_loss",) if rl.has_critic else ("kl_loss",))
    for got, want in zip(resumed, straight):
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["iteration"], key)
    assert all(("value_loss" in h) == rl.has_critic for h in resumed)
