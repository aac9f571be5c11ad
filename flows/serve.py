"""Scheduled runs: one Prefect deployment per pipeline that has a `schedule:`, served by this process.

The deployment is named after the pipeline (`rlhf-pipeline/<pipeline>`); the
work-pool deployments of infra/prefect.yaml are named `<pipeline>-pool`, so
both can live on one server. Each deployment runs one flow run at a time, and
its runs use the same home and config file as the CLI, so scheduled and CLI
runs reuse each other's completed stages.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron, Interval

from flows.pipeline import pipeline_flow
from rlhf.config import load_file
from rlhf.pipeline import Schedule
from rlhf.errors import InputError

def prefect_schedule(schedule: Schedule, pipeline: str):
    common = {"timezone": schedule.timezone, "active": schedule.active, "slug": f"{pipeline}-schedule"}
    if schedule.cron is not None:
        return Cron(schedule.cron, **common)
    return Interval(timedelta(seconds=schedule.interval), **common)


def deployments(config_file: Path, home: Path, names: list[str]) -> list:
    """The deployments for `names` (all scheduled pipelines when empty)."""
    parsed = load_file(config_file)
    scheduled = [name for name, pipeline in parsed.pipelines.items() if pipeline.schedule]
    for name in names:
        if name not in parsed.pipelines:
            raise InputError(f"{config_file}: no pipeline named {name!r}; defined: {', '.join(parsed.pipelines)}")
        if name not in scheduled:
            raise InputError(f"{config_file}: pipelines.{name} has no 'schedule:' (cron or interval) to serve")
    if not (names or scheduled):
        raise InputError(f"{config_file}: no pipeline has a 'schedule:'; add one, e.g. schedule: {{cron: '0 3 * * *'}}")
    result = []
    for name in names or scheduled:
        pipeline = parsed.pipelines[name]
        result.append(
            pipeline_flow.to_deployment(
                name=name,
                description=pipeline.description.strip() or None,
                schedules=[prefect_schedule(pipeline.schedule, name)],
                parameters={
                    "pipeline": name,
                    "overrides": pipeline.schedule.overrides,
                    "config_file": str(config_file.resolve()),
                    "home": str(home),
                    "scheduled": True,  # `schedule.min_new_labels` holds back scheduled runs only
                },
                concurrency_limit=1,
                tags=["rlhf", name],
                entrypoint_type=EntrypointType.MODULE_PATH,  # the package is installed: runs need no source path
            )
        )
    return result


def serve(config_file: Path, home: Path, names: list[str]) -> None:
    """Register the deployments with the server in PREFECT_API_URL and run their flow runs until stopped."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL

    served = deployments(config_file, home, names)
    if not PREFECT_API_URL.value():
        raise InputError(
            "schedules need a Prefect server, and PREFECT_API_URL is not set: start one with "
            "`prefect server start` (or infra/local-up) and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    prefect_serve(*served)
