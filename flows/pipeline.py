"""The pipeline flow: decide which stages run or are reused, then call their tasks in order."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows import report
from flows.logs import quiet_expected_errors
from flows.plan import Planner, plan
from rlhf import cluster, tracking
from rlhf import home as rlhf_home
from rlhf.config import load_pipeline
from rlhf.errors import InputError
from rlhf.lifecycle import completed, reuse_stage
from tasks import stage_task

quiet_expected_errors()


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
        planner = Planner(home_dir, name, config, experiment, parent)
        for stage, action in actions.items():
            spec = planner.spec(stage, force=action == "force")
            found = completed(spec)
            if action == "require" and found is None:
                raise InputError(
                    f"--only {only}: upstream stage '{stage}' is not complete for this config; "
                    f"run `rlhf run {name} --from {stage}` first"
                )
            if found is not None:
                logger.info("stage %s: reused %s (made by MLflow run %s)", stage, spec.fingerprint, found[1]["mlflow_run_id"])
                records[stage] = reuse_stage(spec, *found)
            else:
                logger.info("stage %s: running %s", stage, spec.fingerprint)
                records[stage] = stage_task(stage)(spec)
            planner.complete(stage, records[stage].digest, records[stage].outputs)
        report.log_report(parent, name, tags, list(records.values()))
    return {
        "pipeline": name, "experiment": experiment, "parent_run": parent, "flow_run": str(flow_run.id),
        "stages": list(records.values()),
    }
