"""The Ray cluster a pipeline trains on: check that it can hold the workers, join it, run Ray Train jobs.

A local cluster is started with the CPUs this process may use, so the check
and the cluster agree, and a request it cannot hold is bad config (exit 2)
before any stage runs, instead of a Ray Train job that waits forever for
resources. An existing cluster may be autoscaling: it gets `ray.wait_seconds`
to grow, with a progress line, before the same error.
"""

from __future__ import annotations

import logging
import os
import time

from pydantic import Field

from rlhf import progress, stage_log
from rlhf.blocks import Strict
from rlhf.errors import InputError

log = logging.getLogger("rlhf")
POLL_SECONDS = 15
REMEDY = "lower ray.num_workers or ray.cpus_per_worker, or point ray.address (RAY_ADDRESS) at a larger cluster"


class RayConfig(Strict):
    """Where PPO runs: a local cluster by default, `address` (or RAY_ADDRESS) for an existing one."""

    address: str | None = Field(None, description="an existing Ray cluster (ray://..., or host:port); null: RAY_ADDRESS, else a local cluster")
    num_workers: int = Field(2, ge=1, description="data-parallel workers of each training stage; 1 CPU worker trains without Ray (an RL stage in a child process)")
    cpus_per_worker: int = Field(1, ge=1, description="also the torch threads of each worker")
    use_gpu: bool = Field(False, description="one GPU per worker (nccl), else CPUs (gloo)")
    wait_seconds: int = Field(
        600, ge=0, description="how long an existing (or autoscaling) cluster may take to have room for the workers"
    )

    def trains_on_ray(self) -> bool:
        """Whether training stages run as Ray Train jobs; otherwise they train without Ray (`rlhf/session.py`)."""
        return self.num_workers > 1 or self.use_gpu


def address(cluster: RayConfig) -> str | None:
    return cluster.address or os.environ.get("RAY_ADDRESS")


def local_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def connect(cluster: RayConfig) -> bool:
    """Join the configured cluster, or start a local one; True when this call started the connection."""
    import ray

    if ray.is_initialized():
        return False
    where = address(cluster)
    console = {handler: handler.level for handler in logging.getLogger("ray").handlers}
    if not stage_log.verbose():
        for handler in console:  # "Started a local Ray instance" and the like
            handler.setLevel(logging.ERROR)
    try:
        ray.init(
            address=where,
            num_cpus=None if where else local_cpus(),
            include_dashboard=False,
            runtime_env={
                "env_vars": {
                    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                    # the Train controller notices a finished run at its next poll: every 2 s by default
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"),
                    progress.ON_RAY_WORKER: "1",
                },
                "worker_process_setup_hook": "rlhf.cluster.setup_worker_process",
            },
            log_to_driver=True,
        )
    finally:
        for handler, level in console.items():
            handler.setLevel(level)
    stage_log.route_ray_output()
    return True


def setup_worker_process() -> None:
    """In each Ray worker process: our log lines to its output, which Ray forwards to the stage's log.

    Without the dashboard's state API (not started here: about 1 GB more on a small machine) Ray
    Train's placement-group cleaner warns every second that it cannot query the controller. It only
    matters after a controller crash; a run that ends removes its own placement group.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("rlhf").addHandler(handler)
    logging.getLogger("rlhf").setLevel(logging.INFO)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def backend(cluster: RayConfig) -> str:
    return "nccl" if cluster.use_gpu else "gloo"


def train(cluster: RayConfig, loop, loop_config: dict, run_config):
    """Run `loop(loop_config)` on the cluster's data-parallel workers as a `TorchTrainer`; its result, or what failed it."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started_here = connect(cluster)
    log.info("%s: Ray Train on %s, %d workers, backend %s", run_config.name, address(cluster) or "a local cluster",
             cluster.num_workers, backend(cluster))
    trainer = TorchTrainer(
        train_loop_per_worker=loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cluster.num_workers, use_gpu=cluster.use_gpu, resources_per_worker={"CPU": cluster.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend=backend(cluster)),
        run_config=run_config,
    )
    try:
        result = trainer.fit()
    finally:
        if started_here:
            ray.shutdown()
    if result.error is not None:
        raise result.error
    return result


def check_capacity(cluster: RayConfig) -> None:
    """Exit 2 unless the cluster can place `num_workers` workers of `cpus_per_worker` CPUs (and a GPU each)."""
    where = address(cluster)
    if where is None:
        nodes = [{"CPU": local_cpus(), "GPU": _local_gpus()}]
        if _room(nodes, cluster) < cluster.num_workers:
            raise InputError(f"{_request(cluster)}, but the local Ray cluster has {_describe(nodes)}; {REMEDY}")
        return

    import ray

    started = connect(cluster)
    try:
        deadline = time.monotonic() + cluster.wait_seconds
        while True:
            nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
            room = _room(nodes, cluster)
            if room >= cluster.num_workers:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise InputError(
                    f"{_request(cluster)}, but after {cluster.wait_seconds} s (ray.wait_seconds) the Ray cluster at "
                    f"{where} has {_describe(nodes)}; {REMEDY}"
                )
            log.info("waiting for the Ray cluster at %s: room for %d of %d workers; giving up in %.0f s", where, room,
                     cluster.num_workers, left)
            time.sleep(min(POLL_SECONDS, left))
    finally:
        if started:
            ray.shutdown()


def _room(nodes: list[dict], cluster: RayConfig) -> int:
    """How many workers the nodes can hold: each worker's CPUs (and GPU) must come from one node."""
    def fits(node: dict) -> int:
        count = int(node.get("CPU", 0) // cluster.cpus_per_worker)
        return min(count, int(node.get("GPU", 0))) if cluster.use_gpu else count

    return sum(fits(node) for node in nodes)


def _request(cluster: RayConfig) -> str:
    gpus = " and a GPU each (ray.use_gpu)" if cluster.use_gpu else ""
    return (
        f"ray.num_workers={cluster.num_workers} workers of ray.cpus_per_worker={cluster.cpus_per_worker} CPUs{gpus} "
        f"need {cluster.num_workers * cluster.cpus_per_worker} CPUs"
    )


def _describe(nodes: list[dict]) -> str:
    cpus, gpus = sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes)
    return f"{cpus:g} CPUs and {gpus:g} GPUs on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
