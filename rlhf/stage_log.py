"""A stage's log file, `<stage dir>/stage.log`: what the libraries say while the stage runs.

Their messages and warnings, the trainers' raw metric lines and whatever Ray
Train's workers print go to the file, so the console keeps to our own lines
and the progress display. With `-v` (`RLHF_VERBOSE=1`) the console gets them
as well. The file sits beside `work/`, which is removed when the stage
completes, and is logged to the stage's MLflow run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf import progress

VERBOSE = "RLHF_VERBOSE"
FILE_NAME = "stage.log"
LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "torch", "mlflow", "ray", "urllib3", "py.warnings")
detail = logging.getLogger("rlhf.detail")  # our own lines for the file: the trainers' raw metrics
_ray_output = logging.getLogger("rlhf.ray_output")  # forwarded output of Ray's workers
_ray_output.propagate = False
for _ours in (detail, _ray_output):  # INFO also where no CLI set up logging: a flow run a Prefect worker starts
    _ours.setLevel(logging.INFO)


def verbose() -> bool:
    return os.environ.get(VERBOSE) == "1"


@contextmanager
def capture(path: Path) -> Iterator[None]:
    """While the stage runs: library loggers, warnings and Ray's worker output to `path` (and not the console)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    quiet = not verbose()
    saved = {}
    for name in (*LIBRARIES, detail.name, _ray_output.name):
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate)
        if quiet:
            logger.handlers, logger.propagate = [], False
        logger.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.propagate = handlers, propagate
        handler.close()


def route_ray_output() -> None:
    """After `ray.init`: what Ray's workers print goes to the running stage's log; progress reports to its display."""
    try:  # Ray's handler of forwarded output is private (ray 2.60); with another Ray it stays on the console
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    dispatcher.remove_handler(_HANDLER)
    if not verbose():
        dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler(_HANDLER, _forwarded)


_HANDLER = "rlhf_stage_log"


def _forwarded(batch: dict) -> None:
    if batch.get("pid") == "autoscaler":  # the cluster's status dumps
        return
    source = f"({batch.get('actor_name') or batch.get('task_name') or 'worker'} pid={batch.get('pid')})"
    for line in batch.get("lines", ()):
        if not progress.relay(line):
            _ray_output.info("%s %s", source, line)
