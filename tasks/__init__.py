"""The Prefect face of the stages: one task for every stage, a thin wrapper around the stage's recipe."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from rlhf.lifecycle import StageRecord, StageSpec, recipe, run_stage


@task(cache_policy=NONE, persist_result=False)  # stages decide reuse themselves, from their fingerprints
def _stage(spec: StageSpec) -> StageRecord:
    return run_stage(spec, recipe(spec.stage))


def stage_task(stage: str):
    """The stage's task, named after the stage in the Prefect UI."""
    return _stage.with_options(name=stage)
