"""The life of a stage: fingerprint, lock, MLflow child run, recipe, manifest.

A stage *recipe* (`rlhf/stages/<stage>/recipe.py`) is a plain function from a
`StageContext` to a `StageResult`. `run_stage` wraps it: it takes the stage directory's lock,
resumes the attempt in `work/` if there is one (same MLflow run id), and
writes the manifest last. A recipe that raises leaves no manifest behind.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import import_module, metadata
from pathlib import Path
from typing import Callable

import mlflow
from filelock import Timeout

from rlhf import progress, stage_log, tracking
from rlhf.errors import InputError, ServerLost, StageFailed
from rlhf.gold import Gold, named, task_gold_name
from rlhf.graph import GRAPH
from rlhf.pipeline import Pipeline
from rlhf.site import Site
from rlhf.store import StageDir, digest_tree, fingerprint

log = logging.getLogger("rlhf")

_VERSIONED = ("torch", "transformers", "trl", "peft", "datasets", "mlflow", "prefect", "ray", "rlhf-pipeline")
_RUN_ID_FILE = "mlflow_run_id"


@dataclass(frozen=True)
class StageSpec:
    """Everything needed to run or reuse one stage of one pipeline run."""

    home: Path
    pipeline_name: str
    pipeline: Pipeline
    stage: str
    inputs: dict[str, str]
    upstream: dict[str, Path]
    providers: dict[str, str]  # what the stage needs -> the stage that provides it
    experiment: str
    parent_run: str
    force: bool = False

    @property
    def fingerprint(self) -> str:
        return stage_fingerprint(self.pipeline, self.stage, self.inputs)

    @property
    def dir(self) -> StageDir:
        return StageDir.of(self.home, self.pipeline_name, self.stage, self.fingerprint)


@dataclass(frozen=True)
class StageContext:
    """What a recipe sees: its config, where to read and write, the active MLflow run."""

    stage: str
    fingerprint: str
    pipeline_name: str
    config: object
    seed: int
    pipeline: Pipeline
    upstream: dict[str, Path]  # the outputs of each stage it reads, by stage
    providers: dict[str, str]
    outputs: Path
    work: Path
    run_id: str
    home: Path  # shared caches (prepared pretrained models) live here

    def input(self, need: str) -> Path | None:
        """The outputs of the stage that provides what this one needs (data, policy, reward_model); None when
        no stage of the pipeline provides it."""
        provider = self.providers.get(need)
        return None if provider is None else self.upstream[provider]

    @property
    def gold_name(self) -> str | None:
        """The task's gold reward, by the name the data stage recorded; None when the task has none."""
        return task_gold_name(self.input("data"))

    def gold(self) -> Gold | None:
        return named(self.gold_name)

    @property
    def site(self) -> Site:
        """The home and the label store of the pipeline (its queue: the pipeline's name)."""
        return Site(self.home, self.pipeline_name, self.pipeline.labels)


@dataclass
class StageResult:
    metrics: dict[str, float]
    headline: str  # name of the metric the summary shows


@dataclass
class StageRecord:
    """The small record a stage task returns (never models)."""

    stage: str
    action: str  # ran | resumed | reused
    fingerprint: str
    outputs: Path
    digest: str
    seconds: float
    headline: tuple[str, float] | None
    run_id: str
    source_run_id: str


def stage_fingerprint(pipeline: Pipeline, stage: str, inputs: dict[str, str]) -> str:
    config = getattr(pipeline.stages, stage).model_dump(mode="json")
    if pipeline.runs_on_ray(stage):
        # the workers shape the rollouts and the data shards; where the cluster is does not
        config["ray"] = pipeline.ray.model_dump(mode="json", exclude={"address", "wait_seconds"})
    return fingerprint(stage, config, pipeline.seed, inputs)


def completed(spec: StageSpec) -> tuple[StageDir, dict] | None:
    """Where the stage's result already is, unless the run forces it: its own directory, else the same
    stage and fingerprint made by another pipeline of the home (`demo-grpo` after `demo` reuses data, sft
    and reward). This is the one place that decides reuse."""
    if spec.force:
        return None
    for stage_dir in (spec.dir, *spec.dir.twins()):
        manifest = stage_dir.manifest()
        if manifest is not None:
            return stage_dir, manifest
    return None


def log_path(stage_dir: StageDir) -> Path:
    """The stage's log file: beside `work/`, which goes when the stage completes; a resumed attempt appends."""
    stage_dir.root.mkdir(parents=True, exist_ok=True)
    return stage_dir.root / stage_log.FILE_NAME


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in _VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def _record(spec: StageSpec, stage_dir: StageDir, manifest: dict, action: str, run_id: str, seconds: float) -> StageRecord:
    headline = manifest.get("headline")
    return StageRecord(
        stage=spec.stage,
        action=action,
        fingerprint=manifest["fingerprint"],
        outputs=stage_dir.outputs,
        digest=manifest["outputs"]["digest"],
        seconds=seconds,
        headline=(headline, manifest["metrics"][headline]) if headline else None,
        run_id=run_id,
        source_run_id=manifest["mlflow_run_id"],
    )


def reuse_stage(spec: StageSpec, stage_dir: StageDir, manifest: dict) -> StageRecord:
    started = time.monotonic()
    run_id = tracking.record_reused(spec.experiment, spec.parent_run, spec.stage, manifest)
    log.info("%s: reused %s (made by MLflow run %s)", spec.stage, stage_dir.root, manifest["mlflow_run_id"])
    return _record(spec, stage_dir, manifest, "reused", run_id, time.monotonic() - started)


def recipe(stage: str) -> Callable[[StageContext], StageResult]:
    """The stage's recipe, imported when it runs: a fully reused pipeline never loads torch."""
    module, name = GRAPH[stage].recipe.split(":")
    return getattr(import_module(module), name)


def run_stage(spec: StageSpec, recipe: Callable[[StageContext], StageResult]) -> StageRecord:
    """Run (or resume) a stage under its lock; reuse it if another run completed it meanwhile."""
    stage_dir = spec.dir
    lock = stage_dir.lock()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("%s: busy, another rlhf run holds %s.lock; waiting for it", spec.stage, stage_dir.root)
        lock.acquire()
    try:
        found = completed(spec)
        if found is not None:
            return reuse_stage(spec, *found)
        return _attempt(spec, stage_dir, recipe)
    finally:
        lock.release()


def _attempt(spec: StageSpec, stage_dir: StageDir, recipe: Callable[[StageContext], StageResult]) -> StageRecord:
    run_id_file = stage_dir.work / _RUN_ID_FILE
    resume = run_id_file.read_text().strip() if run_id_file.exists() else None
    if resume:
        log.info("%s: resuming the attempt in %s (MLflow run %s)", spec.stage, stage_dir.work, resume)
    stage_config = getattr(spec.pipeline.stages, spec.stage)
    tags = {"rlhf.stage": spec.stage, "rlhf.fingerprint": spec.fingerprint, "rlhf.pipeline": spec.pipeline_name}
    started_at = datetime.now(timezone.utc)
    started = time.monotonic()
    log_file = log_path(stage_dir)
    try:
        with tracking.stage_run(spec.experiment, spec.parent_run, spec.stage, resume, tags) as run_id:
            stage_dir.work.mkdir(parents=True, exist_ok=True)
            run_id_file.write_text(run_id)
            if resume is None:
                tracking.log_config(stage_config.model_dump(mode="json") | {"seed": spec.pipeline.seed})
            context = StageContext(
                stage=spec.stage,
                fingerprint=spec.fingerprint,
                pipeline_name=spec.pipeline_name,
                config=stage_config,
                seed=spec.pipeline.seed,
                pipeline=spec.pipeline,
                upstream=spec.upstream,
                providers=spec.providers,
                outputs=stage_dir.new_outputs(),
                work=stage_dir.work,
                run_id=run_id,
                home=spec.home,
            )
            from rlhf.seeding import seed_everything

            seed_everything(spec.pipeline.seed)  # heads and adapters are initialised before any trainer seeds
            with stage_log.capture(log_file), progress.stage_display(spec.stage):
                stage_log.detail.info("%s: attempt started (%s, MLflow run %s)", spec.stage,
                                      "resumed" if resume else "new", run_id)
                result = recipe(context)
            seconds = time.monotonic() - started
            manifest = {
                "pipeline": spec.pipeline_name,
                "stage": spec.stage,
                "fingerprint": spec.fingerprint,
                "config": stage_config.model_dump(mode="json"),
                "seed": spec.pipeline.seed,
                "inputs": spec.inputs,
                "outputs": {"digest": digest_tree(context.outputs), "path": str(stage_dir.outputs)},
                "metrics": result.metrics,
                "headline": result.headline,
                "mlflow_run_id": run_id,
                "mlflow_experiment_id": spec.experiment,
                "resumed": resume is not None,
                "started_at": started_at.isoformat(),
                "finished_at": datetime.now(timezone.utc).isoformat(),
                "seconds": round(seconds, 3),
                "versions": versions(),
            }
            mlflow.log_dict(manifest, "manifest.json")
            mlflow.log_artifact(str(log_file))
            mlflow.log_metric("stage_seconds", seconds)
            stage_dir.complete(manifest)
    except InputError:
        raise
    except Exception as exc:
        lost = tracking.lost_server(exc)
        error = ServerLost if lost else StageFailed
        raise error(
            f"stage '{spec.stage}' failed: {lost or f'{type(exc).__name__}: {exc}'}; partial work kept in {stage_dir.work}, "
            f"its log in {log_file}" + ("; run the same command again once it is back: the stage resumes" if lost else "")
        ) from exc
    action = "resumed" if resume else "ran"
    log.info("%s: %s in %.1fs -> %s", spec.stage, action, seconds, stage_dir.root)
    return _record(spec, stage_dir, manifest, action, run_id, seconds)
