"""`rlhf run` from the command line: the Prefect API, a warm-up while it starts, then the pipeline flow."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import httpx

from rlhf.config import Pipeline
from rlhf.errors import ServerLost


def run_pipeline(name: str, pipeline: Pipeline, *, overrides: list[str], from_stage: str | None, only: str | None,
                 config_file: Path, home: Path) -> dict:
    """Run the flow; a lost Prefect API ends it with one line that says what is kept."""
    prefect_api = _start_temporary_prefect_api()
    from flows.pipeline import pipeline_flow

    _warm_up(name, pipeline, home)
    if prefect_api is not None:
        prefect_api.join()
    try:
        return pipeline_flow(
            pipeline=name, overrides=overrides, from_stage=from_stage, only=only, config_file=str(config_file), home=str(home)
        )
    except httpx.TransportError as exc:
        from prefect.settings import PREFECT_API_URL

        raise ServerLost(
            f"the Prefect API {PREFECT_API_URL.value() or ''} stopped answering ({type(exc).__name__}: {exc}); "
            "stages that completed are kept: run the same command again once it is back to reuse them"
        ) from exc


def _start_temporary_prefect_api() -> threading.Thread | None:
    """Without a Prefect server, Prefect starts a temporary one on first use (~12 s on a new home, mostly
    creating its database). Launched now, it starts while the warm-up runs; the import comes first, as
    other imports alongside it would hold the interpreter and delay the launch. Should it fail, the
    flow's own start reports why."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None

    def start() -> None:
        with contextlib.suppress(Exception):
            SubprocessASGIServer().start()

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread


def _warm_up(name: str, pipeline: Pipeline, home: Path) -> None:
    """What the flow needs first, done while the Prefect API starts (~12 s on a new home): the MLflow
    store (~3 s to create), the modules of the stages that will run (torch, transformers: ~5 s) and,
    when one of them trains on Ray, a local cluster (~3 s), which then serves every Ray stage of the run."""
    from flows.pipeline import stage_task
    from rlhf import cluster, tracking
    from rlhf.stages import stage_states

    tracking.configure(home)
    tracking.experiment_id(pipeline.tracking.experiment, home)
    pending = [stage for stage, state, *_ in stage_states(home, name, pipeline) if not state.startswith("complete")]
    for stage in pending:
        stage_task(stage)
    if cluster.address(pipeline.ray) is None and any(pipeline.runs_on_ray(stage) for stage in pending):
        cluster.connect(pipeline.ray)
