"""Run an RL stage's loop and return its final checkpoint: on Ray Train when the `ray` block asks for more
than one worker or a GPU, otherwise in this process (`session.py`).

The run name comes from the stage fingerprint and the storage path from the
stage's work dir, so re-entering the stage with the same fingerprint resumes
from its newest checkpoint, and a changed config starts fresh.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from rlhf import cluster as rlhf_cluster
from rlhf.config import Lora, RayConfig, RlStage
from rlhf.ppo.session import LocalSession


def run(
    stage: str, rl: RlStage, cluster: RayConfig, *, name: str, storage: Path, seed: int, policy_model: Path,
    reward_model: Path, critic_lora: Lora | None, prompts: list, gold: str | None, mlflow_uri: str, mlflow_run_id: str,
) -> Path:
    """Train; returns the directory of the final checkpoint (adapter, critic, normalisation, state, history)."""
    config = {
        "stage": stage,
        "rl": rl.model_dump(mode="json"),
        "seed": seed,
        "threads": cluster.cpus_per_worker,
        "policy_model": str(policy_model),
        "reward_model": str(reward_model),
        "critic_lora": critic_lora.model_dump() if critic_lora else None,
        "prompts": prompts,
        "gold": gold,
        "mlflow_uri": mlflow_uri,
        "mlflow_run_id": mlflow_run_id,
    }
    if not cluster.trains_on_ray():
        return _run_here(config, LocalSession(storage / name, rl.keep_checkpoints))

    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    result = rlhf_cluster.train(
        cluster,
        _train_loop,
        config,
        RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=rl.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=rl.keep_checkpoints),
        ),
    )
    return Path(result.checkpoint.path)


def _run_here(config: dict, session: LocalSession) -> Path:
    from rlhf.ppo.worker import train_loop

    threads = torch.get_num_threads()
    try:
        train_loop(config, session)
    finally:  # the rest of the pipeline runs in this process after the loop
        gc.unfreeze()
        torch.set_num_threads(threads)
    return session.newest()


def _train_loop(config: dict) -> None:
    from rlhf.ppo.worker import train_loop

    train_loop(config)
