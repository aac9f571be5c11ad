"""An RL stage with one CPU worker trains in this process, without Ray, and resumes after a crash to the same numbers."""

import json
import multiprocessing
import os
import signal

import mlflow
import pytest

from conftest import wait_for
from rlhf.config import PpoStage, RayConfig
from rlhf.ppo import driver

PPO = PpoStage(iterations=40, batch_size=4, minibatches=2, epochs=2, max_new_tokens=10, normalisation_samples=4, checkpoint_every=2)
HERE = RayConfig(num_workers=1, cpus_per_worker=1)


def _run(directory, prompts, storage, store):
    """The stage's loop as `tasks/rl.py` calls it, logging to a fresh MLflow run; returns the history."""
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    run = mlflow.MlflowClient().create_run("0")
    final = driver.run(
        "ppo", PPO, HERE, name="ppo-test", storage=storage, seed=0, policy_model=directory, reward_model=directory,
        critic_lora=None, prompts=prompts, gold="synthetic_reviews", mlflow_uri=mlflow.get_tracking_uri(),
        mlflow_run_id=run.info.run_id,
    )
    return json.loads((final / "history.json").read_text())


def test_a_crash_resumes_from_the_newest_whole_checkpoint_to_the_same_history(tiny_model, tmp_path):
    directory, _, prompts = tiny_model
    straight = _run(directory, prompts, tmp_path / "straight", tmp_path / "straight.db")
    assert [h["iteration"] for h in straight] == list(range(1, 41))
    assert sorted(p.name for p in (tmp_path / "straight" / "ppo-test").iterdir()) == ["checkpoint_000038", "checkpoint_000040"]

    storage = tmp_path / "crashed"
    crashing = multiprocessing.get_context("spawn").Process(target=_run, args=(directory, prompts, storage, tmp_path / "crashed.db"))
    crashing.start()
    wait_for(lambda: (storage / "ppo-test" / "checkpoint_000004").exists() or not crashing.is_alive(), 300, "a checkpoint")
    assert crashing.is_alive(), "the run ended before it could be killed"
    os.kill(crashing.pid, signal.SIGKILL)
    crashing.join()
    (storage / "ppo-test" / ".partial-40").mkdir()  # as a crash in the middle of writing one leaves it

    resumed = _run(directory, prompts, storage, tmp_path / "crashed.db")
    assert 4 <= max(h["restored_from"] for h in resumed) < 40
    assert len(resumed) == len(straight)
    for got, want in zip(resumed, straight):
        for key in ("policy_loss", "score", "kl", "value_loss", "reward_total", "gold"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["iteration"], key)
