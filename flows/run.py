"""`rlhf run` from the command line: the Prefect API, a warm-up while it starts, then the pipeline flow."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import httpx

from rlhf.errors import ServerLost
from rlhf.pipeline import Pipeline


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
    """Without a Prefect server, Prefect starts a temporary one on first use: 7.5 s, or 16 s on a new home
    whose database it migrates, so a new home starts from a copy of one migrated before. Launched now, it
    starts while the warm-up runs; the import comes first, as other imports alongside it would hold the
    interpreter and delay the launch. Should it fail, the flow's own start reports why. With a server
    to talk to, Prefect's server modules (2.5 s to import) stay unloaded."""
    import prefect
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    prefect_home = Path(os.environ["PREFECT_HOME"])
    template = Path.home() / ".cache" / "rlhf-pipeline" / f"prefect-{prefect.__version__}"
    own_database = "PREFECT_API_DATABASE_CONNECTION_URL" not in os.environ
    new = own_database and not (prefect_home / _DATABASE).exists()
    if new and (template / _DATABASE).exists():
        _from_template(template, prefect_home)

    def start() -> None:
        server = SubprocessASGIServer()
        try:
            server.start()
        except Exception:  # e.g. no answer in time on a busy machine: its process must not outlive this one
            server.stop()  # (it would hold this process's output open); the flow's own client starts another
            return
        with contextlib.suppress(Exception):
            if new and not (template / _DATABASE).exists():
                _save_template(prefect_home, template)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread


_DATABASE = "prefect.db"


def _from_template(template: Path, prefect_home: Path) -> None:
    """Prefect's database from the template, unless another run on this home made one first (a link
    cannot replace a file, so that run's open database is never overwritten)."""
    prefect_home.mkdir(parents=True, exist_ok=True)
    partial = prefect_home / f".{_DATABASE}.{os.getpid()}"
    shutil.copy(template / _DATABASE, partial)
    try:
        os.link(partial, prefect_home / _DATABASE)
        for memo in template.glob("memo_store.toml"):
            shutil.copy(memo, prefect_home)
    except FileExistsError:
        pass
    finally:
        partial.unlink()


def _save_template(prefect_home: Path, template: Path) -> None:
    """Prefect's database as its server left it on a new home, migrated and with its block types registered,
    for the next new home to start from: migrating a new database takes ~8 s of Prefect's start on 2 cores."""
    partial = template.with_name(f"{template.name}.{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(prefect_home / _DATABASE)) as source, \
            contextlib.closing(sqlite3.connect(partial / _DATABASE)) as copy:
        source.backup(copy)  # consistent while the server runs, its write-ahead log included
    for memo in prefect_home.glob("memo_store.toml"):  # says the block types are registered
        shutil.copy(memo, partial)
    with contextlib.suppress(OSError):  # another run saved one first
        os.replace(partial, template)
    shutil.rmtree(partial, ignore_errors=True)


def _warm_up(name: str, pipeline: Pipeline, home: Path) -> None:
    """What the flow needs first, done while the Prefect API starts (7.5 s): the MLflow
    store (~3 s to create), the modules of the stages that will run (torch, transformers: ~5 s) and,
    when one of them trains on Ray, a local cluster (~3 s), which then serves every Ray stage of the run."""
    from rlhf import cluster, tracking
    from flows.plan import stage_states
    from rlhf.lifecycle import recipe

    tracking.configure(home)
    tracking.experiment_id(pipeline.tracking.experiment, home)
    pending = [stage for stage, state, *_ in stage_states(home, name, pipeline) if not state.startswith("complete")]
    for stage in pending:
        recipe(stage)
    if cluster.address(pipeline.ray) is None and any(pipeline.runs_on_ray(stage) for stage in pending):
        cluster.connect(pipeline.ray)
