"""The Ray driver side of an RL stage: start or join a cluster, run the TorchTrainer, return its final checkpoint.

The run name comes from the stage fingerprint and the storage path from the
stage's work dir, so re-entering the stage with the same fingerprint makes
Ray Train restore its newest checkpoint, and a changed config starts fresh.
"""

from __future__ import annotations

from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig

from rlhf import cluster as rlhf_cluster
from rlhf.config import Lora, RayConfig, RlStage


def run(
    stage: str, rl: RlStage, cluster: RayConfig, *, name: str, storage: Path, seed: int, policy_model: Path,
    reward_model: Path, critic_lora: Lora | None, prompts: list, gold: str | None, mlflow_uri: str, mlflow_run_id: str,
) -> Path:
    """Train; returns the directory of the final checkpoint (adapter, critic, normalisation, state, history)."""
    result = rlhf_cluster.train(
        cluster,
        _train_loop,
        {
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
        },
        RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=rl.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=rl.keep_checkpoints),
        ),
    )
    return Path(result.checkpoint.path)


def _train_loop(config: dict) -> None:
    from rlhf.ppo.worker import train_loop

    train_loop(config)
