"""Where the RL loop runs: on Ray Train workers, or in this process when the `ray` block asks for one CPU worker.

Either way the loop gets its rank, world size and device, the checkpoint to
resume from, and a directory to fill with each new checkpoint. In this
process a run skips Ray Train's start-up (about 14 s on 2 cores): the
checkpoints are directories under the run's storage, each renamed into place
once complete, so a crash leaves the one before intact, and re-entering the
stage resumes from the newest.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhf import stage_log

_PREFIX = "checkpoint_"


class RaySession:
    """One Ray Train worker of the run; Ray Train keeps and restores the checkpoints."""

    def __init__(self):
        import ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.place = f"on Ray node {ray.get_runtime_context().get_node_id()}"

    def say(self, line: str) -> None:
        print(line, flush=True)  # Ray forwards it to the stage's log

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    @contextmanager
    def checkpoint(self, metrics: dict, iteration: int) -> Iterator[Path | None]:
        """A directory for rank 0 to fill (None on the others); reported to Ray Train, with the metrics, on exit."""
        import tempfile

        import ray.train
        from ray.train import Checkpoint

        if self.rank != 0:
            yield None
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as directory:
            yield Path(directory)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))


class LocalSession:
    """This process alone, on the CPU; the newest `keep` checkpoints stay under `directory`."""

    rank, world, place = 0, 1, "in this process"
    device = torch.device("cpu")

    def __init__(self, directory: Path, keep: int):
        self.directory, self.keep = directory, keep

    def say(self, line: str) -> None:
        stage_log.detail.info(line)

    def newest(self) -> Path | None:
        found = sorted(self.directory.glob(f"{_PREFIX}*"))
        return found[-1] if found else None

    @contextmanager
    def restored(self) -> Iterator[Path | None]:
        yield self.newest()

    @contextmanager
    def checkpoint(self, metrics: dict, iteration: int) -> Iterator[Path]:
        for stale in self.directory.glob(".partial-*"):  # left by a crash mid-write
            shutil.rmtree(stale)
        partial = self.directory / f".partial-{iteration}"
        partial.mkdir(parents=True)
        yield partial
        os.replace(partial, self.directory / f"{_PREFIX}{iteration:06d}")
        for old in sorted(self.directory.glob(f"{_PREFIX}*"))[: -self.keep]:
            shutil.rmtree(old)
