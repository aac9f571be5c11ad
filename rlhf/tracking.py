"""MLflow: the store under the home, a parent run per pipeline run, a child run per stage.

The parent run is created with the client and never made the *active* run,
so each stage run is the only active run in its thread: transformers' MLflow
callback logs into it instead of opening a run of its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

PARAM_PREFIX = "cfg."  # keeps our params apart from those transformers' callback logs


def tracking_uri(home: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home.resolve()}/mlflow.db"


def is_local(uri: str) -> bool:
    return uri.startswith("sqlite:")


def configure(home: Path) -> str:
    uri = tracking_uri(home)
    mlflow.set_tracking_uri(uri)
    return uri


# MLflow 3's UI opens experiments in its GenAI view unless told otherwise: by this experiment tag
# in the versions that read it, by the link's query in those that keep the choice per browser
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
TRAINING_VIEW = "workflowType=machine_learning"


def experiment_id(name: str, home: Path) -> str:
    """Get or create the experiment (marked for the model-training view); a local store keeps its artifacts under the home."""
    if not is_local(mlflow.get_tracking_uri()):
        return _experiment_id(name, home)
    with FileLock(str(home / "mlflow.db.lock")):  # two runs on a new home would both create the store's tables
        return _experiment_id(name, home)


def _experiment_id(name: str, home: Path) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if KIND_TAG not in found.tags:
            MlflowClient().set_experiment_tag(found.experiment_id, KIND_TAG, MODEL_TRAINING)
        return found.experiment_id
    location = (home.resolve() / "mlartifacts" / name).as_uri() if is_local(mlflow.get_tracking_uri()) else None
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags={KIND_TAG: MODEL_TRAINING})
    except MlflowException:  # another process created it first
        return mlflow.get_experiment_by_name(name).experiment_id


def run_link(experiment: str, run_id: str) -> str:
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment}/runs/{run_id}?{TRAINING_VIEW}"


def git_commit(directory: Path) -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


@contextmanager
def pipeline_run(experiment: str, pipeline: str, tags: dict[str, str]) -> Iterator[str]:
    """The parent run of one pipeline run; ends FAILED if the pipeline raised."""
    client = MlflowClient()
    run = client.create_run(experiment, run_name=pipeline, tags={"rlhf.pipeline": pipeline, **tags})
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException as exc:
        with contextlib.suppress(MlflowException):  # the server may be what failed: keep the first error
            client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


@contextmanager
def stage_run(experiment: str, parent: str, stage: str, resume: str | None, tags: dict[str, str]) -> Iterator[str]:
    """The stage's child run: a new one, or `resume`, re-hung under the current parent."""
    if resume is None:
        run = mlflow.start_run(experiment_id=experiment, run_name=stage, parent_run_id=parent, tags=tags)
    else:
        run = mlflow.start_run(run_id=resume)
        mlflow.set_tags({"mlflow.parentRunId": parent, "rlhf.resumed": "true"})
    try:
        yield run.info.run_id
    except BaseException as exc:
        with contextlib.suppress(MlflowException):
            mlflow.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run()


def lost_server(error: BaseException) -> str | None:
    """What to tell the user when `error` comes from the tracking server no longer answering."""
    import requests

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, requests.exceptions.ConnectionError):
            return f"the MLflow tracking server {mlflow.get_tracking_uri()} stopped answering"
        error = error.__cause__ or error.__context__
    return None


def log_config(config: dict) -> None:
    params = flatten(config, PARAM_PREFIX)
    items = list(params.items())
    for start in range(0, len(items), 100):  # the API takes at most 100 params a call
        mlflow.log_params(dict(items[start : start + 100]))


def record_reused(experiment: str, parent: str, stage: str, manifest: dict) -> str:
    """A finished child run that says the stage was reused and links to the run that made it."""
    client = MlflowClient()
    source = manifest["mlflow_run_id"]
    run = client.create_run(
        experiment,
        run_name=f"{stage} (reused)",
        tags={
            "mlflow.parentRunId": parent,
            "rlhf.stage": stage,
            "rlhf.reused": "true",
            "rlhf.reused_from": source,
            "rlhf.fingerprint": manifest["fingerprint"],
        },
    )
    for name, value in manifest["metrics"].items():
        client.log_metric(run.info.run_id, name, value)
    client.set_terminated(run.info.run_id, "FINISHED")
    client.set_tag(parent, f"rlhf.reused.{stage}", source)
    return run.info.run_id


def tag_waiting(parent: str, why: str) -> None:
    """The pipeline run stopped before a stage that waits for people (a normal end, not a failure)."""
    MlflowClient().set_tag(parent, "rlhf.waiting", why)


def log_with_parent(run_id: str, metrics: dict[str, float]) -> None:
    """Metrics that arrive after a stage ran (people's verdict on its policy), on its run and on its pipeline run's."""
    client = MlflowClient()
    parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
    now = int(time.time() * 1000)
    for run in filter(None, (run_id, parent)):
        client.log_batch(run, metrics=[Metric(name, value, now, 0) for name, value in metrics.items()])
