"""The Ray driver side of PPO: start or join a cluster, run the TorchTrainer, return its final checkpoint.

The run name comes from the stage fingerprint and the storage path from the
stage's work dir, so re-entering the stage with the same fingerprint makes
Ray Train restore its newest checkpoint, and a changed config starts fresh.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rlhf.config import Lora, PpoStage, RayConfig

log = logging.getLogger("rlhf")


def run(
    ppo: PpoStage, cluster: RayConfig, *, name: str, storage: Path, seed: int, policy_model: Path, reward_model: Path,
    critic_lora: Lora | None, prompts: list, gold: str | None, mlflow_uri: str, mlflow_run_id: str,
) -> Path:
    """Train; returns the directory of the final checkpoint (adapter, critic, normalisation, state, history)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    address = cluster.address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            include_dashboard=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            log_to_driver=True,
        )
    log.info("ppo: Ray cluster %s, %d workers", address or "local", cluster.num_workers)
    trainer = TorchTrainer(
        train_loop_per_worker=_train_loop,
        train_loop_config={
            "ppo": ppo.model_dump(mode="json"),
            "seed": seed,
            "threads": cluster.cpus_per_worker,
            "use_gpu": cluster.use_gpu,
            "policy_model": str(policy_model),
            "reward_model": str(reward_model),
            "critic_lora": critic_lora.model_dump() if critic_lora else None,
            "prompts": prompts,
            "gold": gold,
            "mlflow_uri": mlflow_uri,
            "mlflow_run_id": mlflow_run_id,
        },
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers,
            use_gpu=cluster.use_gpu,
            resources_per_worker={"CPU": cluster.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cluster.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=ppo.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=ppo.keep_checkpoints),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
    if result.error is not None:
        raise result.error
    return Path(result.checkpoint.path)


def _train_loop(config: dict) -> None:
    from rlhf.ppo.worker import train_loop

    train_loop(config)
