"""The pipeline flow: decide which stages run or are reused, then call their tasks in order."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.logs import quiet_expected_errors
from rlhf import cluster
from rlhf import home as rlhf_home
from rlhf import report, tracking
from rlhf.config import load_pipeline, plan
from rlhf.data.sources import external_inputs
from rlhf.errors import InputError
from rlhf.stages import StageSpec, reuse_stage, upstream_inputs

quiet_expected_errors()
STAGE_TASKS = {"data": "data_prep:data_prep", "sft": "sft:sft", "reward": "reward:reward", "ppo": "ppo:ppo", "evaluate": "evaluate:evaluate"}


def stage_task(stage: str):
    """The stage's Prefect task, imported only when the stage runs: a fully reused pipeline never loads torch."""
    module, name = STAGE_TASKS[stage].split(":")
    return getattr(import_module(f"tasks.{module}"), name)


@flow(name="rlhf-pipeline", flow_run_name="{pipeline}", persist_result=False)
def pipeline_flow(
    pipeline: str | None = None,
    overrides: list[str] | None = None,
    from_stage: str | None = None,
    only: str | None = None,
    config_file: str | None = None,
    home: str | None = None,
) -> dict:
    logger = get_run_logger()
    config_path = Path(config_file) if config_file else rlhf_home.default_config()
    home_dir = rlhf_home.resolve(home)
    rlhf_home.prepare_stages(home_dir)  # a run started by a Prefect worker did not come through the CLI
    name, config = load_pipeline(config_path, pipeline, overrides or [])
    actions = plan(config.stages.present(), from_stage, only)
    if any(action != "require" and config.runs_on_ray(stage) for stage, action in actions.items()):
        cluster.check_capacity(config.ray)  # before any stage: not after hours of SFT

    tracking.configure(home_dir)
    experiment = tracking.experiment_id(config.tracking.experiment, home_dir)
    tags = {
        "rlhf.config_hash": config.fingerprint(),
        "rlhf.prefect_flow_run_id": str(flow_run.id),
        "rlhf.git_commit": tracking.git_commit(config_path.parent),
        "rlhf.selection": f"--from {from_stage}" if from_stage else f"--only {only}" if only else "all",
    }
    records = {}
    with tracking.pipeline_run(experiment, name, tags) as parent:
        for stage, action in actions.items():
            digests, paths = upstream_inputs(stage, records)
            spec = StageSpec(
                home=home_dir,
                pipeline_name=name,
                pipeline=config,
                stage=stage,
                inputs=digests | external_inputs(stage, config),
                upstream=paths,
                experiment=experiment,
                parent_run=parent,
                force=action == "force",
            )
            manifest = spec.dir.manifest()
            if action == "require" and manifest is None:
                raise InputError(
                    f"--only {only}: upstream stage '{stage}' is not complete for this config; "
                    f"run `rlhf run {name} --from {stage}` first"
                )
            if manifest is not None and action != "force":
                logger.info("stage %s: reused %s (made by MLflow run %s)", stage, spec.fingerprint, manifest["mlflow_run_id"])
                records[stage] = reuse_stage(spec, manifest)
            else:
                logger.info("stage %s: running %s", stage, spec.fingerprint)
                records[stage] = stage_task(stage)(spec)
        report.log_report(parent, name, tags, list(records.values()))
    return {
        "pipeline": name, "experiment": experiment, "parent_run": parent, "flow_run": str(flow_run.id),
        "stages": list(records.values()),
    }
