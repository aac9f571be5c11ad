"""Where a training stage runs: in this process, or on the data-parallel workers of a Ray Train job.

`run` is the one place that decides, for the TRL stages and the RL stages
alike: a `ray` block of one CPU worker trains in this process (no Ray Train
start-up: about 14 s on 2 cores), or, for a loop that asks for it (the RL
stages), in a fresh Python process of its own; anything more (workers, a GPU)
on Ray Train. The RL loop's own process starts in about 5 s and holds only
what the loop loads: in the driver, after the reward stage, SmolLM2's PPO
peaked at 3.07 GB, 0.8 GB of it what the stages before had left behind
(freed, but not given back to the system), against 2.26 GB on its own.
Either way the stage's loop is called with a session that gives it its rank,
world size and device, the checkpoint to resume from, and a directory to fill
with each new checkpoint. Ray Train keeps the checkpoints of a job; in this
process they are directories under the run's storage, each renamed into place
once complete, so a crash leaves the one before intact. The run is named
after the stage fingerprint and stored in the stage's work dir, so
re-entering the stage resumes from the newest checkpoint, and a changed
config starts fresh.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from rlhf import cluster as rlhf_cluster
from rlhf import progress, stage_log, training
from rlhf.cluster import RayConfig

_PREFIX = "checkpoint_"


def run(cluster: RayConfig, loop: Callable[[dict, object], None], config: dict, *, name: str, storage: Path, keep: int,
        max_failures: int = 0, own_process: bool = False) -> Path | None:
    """`loop(config, session)` here (in a process of its own with `own_process`) or on every Ray Train worker;
    the directory of the final checkpoint, if any.

    On Ray, `loop` and `config` are pickled to the workers, which may be on other nodes (with this project
    installed and the home on shared storage): `config` holds plain values."""
    if not cluster.trains_on_ray() and own_process:
        return _in_own_process(loop, config, storage / name, keep)
    if not cluster.trains_on_ray():
        session = LocalSession(storage / name, keep)
        threads = torch.get_num_threads()
        try:
            loop(config, session)
        finally:  # the rest of the pipeline runs in this process after the loop
            gc.unfreeze()
            torch.set_num_threads(threads)
        return session.newest()

    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    result = rlhf_cluster.train(cluster, partial(_on_ray_worker, loop), config, RunConfig(
        name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=keep),
    ))
    return Path(result.checkpoint.path) if result.checkpoint is not None else None


def _in_own_process(loop, config: dict, directory: Path, keep: int) -> Path | None:
    """`loop` in a child Python process, as one local worker. What it prints reaches the stage's log and progress
    display as a Ray worker's output does; an exception it raises is raised here (an InputError stays exit 2)."""
    training.release_freed()  # this process waits for the child meanwhile: no need to hold what it freed
    directory.mkdir(parents=True, exist_ok=True)
    failure = directory / ".failure.pickle"
    failure.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-P", "-c", "from rlhf.session import _child_main; _child_main()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=os.environ | {progress.ON_RAY_WORKER: "1", "PYTHONUNBUFFERED": "1"},
    )
    try:
        pickle.dump((loop, config, directory, keep, failure, os.getpid()), child.stdin)
        child.stdin.close()
        for raw in child.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if not progress.relay(line):
                stage_log.detail.info(line)
        code = child.wait()
    finally:
        if child.poll() is None:  # this process was interrupted: the worker must not train on without it
            child.kill()
            child.wait()
    if failure.exists():
        raised = pickle.loads(failure.read_bytes())
        failure.unlink()
        raise raised
    if code != 0:
        raise RuntimeError(f"the training process exited with {code}; its output is in the stage log")
    return LocalSession(directory, keep).newest()


def _child_main() -> None:
    """The child of `_in_own_process`: run the pickled loop; an exception goes back pickled beside the checkpoints."""
    loop, config, directory, keep, failure, parent = pickle.load(sys.stdin.buffer)
    if sys.platform.startswith("linux"):  # dies with its parent, even a SIGKILLed one
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            sys.exit(1)
    try:
        loop(config, OwnProcessSession(directory, keep))
    except BaseException as exc:
        traceback.print_exc()
        try:
            failure.write_bytes(pickle.dumps(exc))
        except Exception:  # an exception that does not pickle: the traceback above and the exit code tell
            pass
        sys.exit(1)


def _on_ray_worker(loop, config: dict) -> None:
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # per-report INFO lines drown the stage's progress lines
    loop(config, RaySession())


class RaySession:
    """One Ray Train worker of the run; Ray Train keeps and restores the checkpoints."""

    remote = True

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
    remote = False
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


class OwnProcessSession(LocalSession):
    """The one local worker in a child process (`_in_own_process`): its lines go to the parent, which logs them."""

    place = "in its own process"

    def say(self, line: str) -> None:
        print(line, flush=True)
