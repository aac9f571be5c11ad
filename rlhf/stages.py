"""The life of a stage: fingerprint, lock, MLflow child run, recipe, manifest.

A stage *recipe* (in `tasks/`) is a plain function from a `StageContext` to a
`StageResult`. `run_stage` wraps it: it takes the stage directory's lock,
resumes the attempt in `work/` if there is one (same MLflow run id), and
writes the manifest last. A recipe that raises leaves no manifest behind.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import mlflow
from filelock import Timeout

from rlhf import progress, stage_log, tracking
from rlhf.config import Pipeline
from rlhf.data.sources import external_inputs
from rlhf.errors import InputError, StageFailed
from rlhf.store import StageDir, digest_tree, fingerprint

log = logging.getLogger("rlhf")

# Which completed stages each stage reads.
UPSTREAM: dict[str, tuple[str, ...]] = {
    "data": (),
    "sft": ("data",),
    "reward": ("data", "sft"),
    "ppo": ("data", "sft", "reward"),
    "evaluate": ("data", "sft", "reward", "ppo"),
}

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
    upstream: dict[str, Path]
    outputs: Path
    work: Path
    run_id: str
    home: Path  # shared caches (prepared pretrained models) live here


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


def stage_states(home: Path, name: str, pipeline: Pipeline) -> list[tuple[str, ...]]:
    """Rows for `rlhf status`: stage, state, fingerprint, finished at, headline, MLflow run."""
    rows, digests = [], {}
    for stage in pipeline.stages.present():
        reads = [u for u in UPSTREAM[stage] if u in pipeline.stages.present()]
        waiting = [u for u in reads if u not in digests]
        if waiting:
            rows.append((stage, f"waits for {waiting[0]}", "", "", "", ""))
            continue
        inputs = {u: digests[u] for u in reads} | external_inputs(stage, pipeline)
        stage_fp = stage_fingerprint(pipeline, stage, inputs)
        stage_dir = StageDir.of(home, name, stage, stage_fp)
        manifest = stage_dir.manifest()
        if manifest is not None:
            digests[stage] = manifest["outputs"]["digest"]
            headline = manifest.get("headline")
            shown = f"{headline} = {manifest['metrics'][headline]:.6g}" if headline else ""
            rows.append((stage, "complete", stage_fp, manifest["finished_at"][:19], shown, manifest["mlflow_run_id"]))
        elif stage_dir.is_busy():
            rows.append((stage, "running", stage_fp, "", "", ""))
        elif stage_dir.work.exists():
            rows.append((stage, f"partial, resumable ({stage_dir.work})", stage_fp, "", "", ""))
        else:
            rows.append((stage, "not run", stage_fp, "", "", ""))
    return rows


def upstream_inputs(stage: str, records: dict[str, StageRecord]) -> tuple[dict[str, str], dict[str, Path]]:
    """Digests and output paths of the completed upstream stages this stage reads."""
    names = [name for name in UPSTREAM[stage] if name in records]
    return {name: records[name].digest for name in names}, {name: records[name].outputs for name in names}


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


def _record(spec: StageSpec, manifest: dict, action: str, run_id: str, seconds: float) -> StageRecord:
    headline = manifest.get("headline")
    return StageRecord(
        stage=spec.stage,
        action=action,
        fingerprint=manifest["fingerprint"],
        outputs=spec.dir.outputs,
        digest=manifest["outputs"]["digest"],
        seconds=seconds,
        headline=(headline, manifest["metrics"][headline]) if headline else None,
        run_id=run_id,
        source_run_id=manifest["mlflow_run_id"],
    )


def reuse_stage(spec: StageSpec, manifest: dict) -> StageRecord:
    started = time.monotonic()
    run_id = tracking.record_reused(spec.experiment, spec.parent_run, spec.stage, manifest)
    log.info("%s: reused %s (made by MLflow run %s)", spec.stage, spec.fingerprint, manifest["mlflow_run_id"])
    return _record(spec, manifest, "reused", run_id, time.monotonic() - started)


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
        manifest = stage_dir.manifest()
        if manifest is not None and not spec.force:
            return reuse_stage(spec, manifest)
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
        raise StageFailed(
            f"stage '{spec.stage}' failed: {type(exc).__name__}: {exc}; partial work kept in {stage_dir.work}, "
            f"its log in {log_file}"
        ) from exc
    action = "resumed" if resume else "ran"
    log.info("%s: %s in %.1fs -> %s", spec.stage, action, seconds, stage_dir.root)
    return _record(spec, manifest, action, run_id, seconds)
