"""Planning a pipeline run: which stages run, are reused or must already be complete, each stage's
fingerprint from the digests of the stages it reads, and the rows of `rlhf status`."""

from __future__ import annotations

from pathlib import Path

from rlhf.errors import InputError
from rlhf.lifecycle import StageSpec, completed
from rlhf.pipeline import Pipeline
from rlhf.site import Site


def plan(stages: list[str], from_stage: str | None, only: str | None) -> dict[str, str]:
    """stage -> 'auto' (reuse if complete), 'force' (run again) or 'require' (must be complete).

    `--only S` runs S alone (reused when complete, like any stage); `--from S --only S` forces it.
    """
    for option, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in stages:
            raise InputError(f"{option} {value}: no such stage in this pipeline; stages: {', '.join(stages)}")
    if only:
        if from_stage not in (None, only):
            raise InputError(f"--from {from_stage} --only {only}: together they must name the same stage")
        return {stage: "require" for stage in stages[: stages.index(only)]} | {only: "force" if from_stage else "auto"}
    forced_from = stages.index(from_stage) if from_stage else len(stages)
    return {stage: "force" if i >= forced_from else "auto" for i, stage in enumerate(stages)}


class Planner:
    """Walks a pipeline's stages in order, each fingerprinted from the digests of the stages it reads.

    `rlhf run` (the flow) and `rlhf status` both plan with it, so they agree on every fingerprint.
    """

    def __init__(self, home: Path, name: str, pipeline: Pipeline, experiment: str = "", parent_run: str = ""):
        self.home, self.name, self.pipeline = home, name, pipeline
        self.site = Site(home, name, pipeline.labels)
        self.experiment, self.parent_run = experiment, parent_run
        self.done: dict[str, tuple[str, Path]] = {}  # stage -> digest and outputs of its complete result

    def spec(self, stage: str, force: bool = False) -> StageSpec | None:
        """The stage's spec; None while a stage it reads has no complete result yet."""
        reads = self.pipeline.stages.reads(stage)
        if any(name not in self.done for name in reads):
            return None
        block = self.pipeline.stages.block(stage)
        return StageSpec(
            home=self.home, pipeline_name=self.name, pipeline=self.pipeline, stage=stage,
            inputs={name: self.done[name][0] for name in reads} | block.external_inputs() | block.live_inputs(self.site),
            upstream={name: self.done[name][1] for name in reads},
            providers=self.pipeline.stages.providers(stage),
            experiment=self.experiment, parent_run=self.parent_run, force=force,
        )

    def waiting_for(self, stage: str) -> str:
        return next(name for name in self.pipeline.stages.reads(stage) if name not in self.done)

    def waiting(self, stage: str) -> str | None:
        """Why the stage cannot start although its upstream is complete (e.g. too few judgements yet), or None."""
        return self.pipeline.stages.block(stage).waiting(self.site)

    def complete(self, stage: str, digest: str, outputs: Path) -> None:
        self.done[stage] = (digest, outputs)


def stage_states(home: Path, name: str, pipeline: Pipeline) -> list[tuple[str, ...]]:
    """Rows for `rlhf status`: stage, state, fingerprint, finished at, headline, MLflow run."""
    rows, planner = [], Planner(home, name, pipeline)
    for stage in pipeline.stages.present():
        spec = planner.spec(stage)
        if spec is None:
            rows.append((stage, f"waits for {planner.waiting_for(stage)}", "", "", "", ""))
            continue
        found = completed(spec)
        if found is not None:
            stage_dir, manifest = found
            planner.complete(stage, manifest["outputs"]["digest"], stage_dir.outputs)
            headline = manifest.get("headline")
            shown = f"{headline} = {manifest['metrics'][headline]:.6g}" if headline else ""
            where = "" if stage_dir == spec.dir else f" (from {stage_dir.root.parents[1].name})"  # made by that pipeline
            rows.append((stage, f"complete{where}", spec.fingerprint, manifest["finished_at"][:19], shown, manifest["mlflow_run_id"]))
        elif spec.dir.is_busy():
            rows.append((stage, "running", spec.fingerprint, "", "", ""))
        elif spec.dir.work.exists():
            rows.append((stage, f"partial, resumable ({spec.dir.work})", spec.fingerprint, "", "", ""))
        elif why := planner.waiting(stage):
            rows.append((stage, why, spec.fingerprint, "", "", ""))
        else:
            rows.append((stage, "not run", spec.fingerprint, "", "", ""))
    return rows
