"""Run an RL stage's loop, in a process of its own or on Ray Train (`rlhf/session.py` decides), and return its final checkpoint."""

from __future__ import annotations

from pathlib import Path

from rlhf import session
from rlhf.blocks import Lora
from rlhf.cluster import RayConfig
from rlhf.stages.rl.config import RlStage
from rlhf.ppo.worker import train_loop


def run(
    stage: str, rl: RlStage, cluster: RayConfig, *, name: str, storage: Path, seed: int, policy_model: Path,
    reward_model: Path, critic_lora: Lora | None, prompts: list, gold: str | None, mlflow_uri: str, mlflow_run_id: str,
) -> Path:
    """Train; returns the directory of the final checkpoint (adapter, critic, normalisation, state, history)."""
    config = {
        "stage": stage,
        "rl": rl,  # the block itself: Ray pickles it by its class, which the workers import
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
    return session.run(cluster, train_loop, config, name=name, storage=storage, keep=rl.keep_checkpoints,
                       max_failures=rl.max_failures, own_process=True)
