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
from rlhf.pipeline import Pipeline
from rlhf.site import Site
from tasks import stage_task

quiet_expected_errors()

TRAINED = "trained"  # the label store's mark: the last judgement a completed run of the pipeline could train on


@flow(name="rlhf-pipeline", flow_run_name="{pipeline}", persist_result=False)
def pipeline_flow(
    pipeline: str | None = None,
    overrides: list[str] | None = None,
    from_stage: str | None = None,
    only: str | None = None,
    config_file: str | None = None,
    home: str | None = None,
    scheduled: bool = False,
) -> dict:
    logger = get_run_logger()
    config_path = Path(config_file) if config_file else rlhf_home.default_config()
    home_dir = rlhf_home.resolve(home)
    rlhf_home.prepare_stages(home_dir)  # a run started by a Prefect worker did not come through the CLI
    name, config = load_pipeline(config_path, pipeline, overrides or [])
    actions = plan(config.stages.present(), from_stage, only)
    if any(action != "require" and config.runs_on_ray(stage) for stage, action in actions.items()):
        cluster.check_capacity(config.ray)  # before any stage: not after hours of SFT

    site = Site(home_dir, name, config.labels)
    if scheduled and (why := _nothing_new(config, site)):
        logger.info(why)
        return {"pipeline": name, "flow_run": str(flow_run.id), "stages": [], "waiting": why}
    judged_until = site.store().last_judgement_id(site.queue) if config.stages.judged() else None

    tracking.configure(home_dir)
    experiment = tracking.experiment_id(config.tracking.experiment, home_dir)
    tags = {
        "rlhf.config_hash": config.fingerprint(),
        "rlhf.prefect_flow_run_id": str(flow_run.id),
        "rlhf.git_commit": tracking.git_commit(config_path.parent),
        "rlhf.selection": f"--from {from_stage}" if from_stage else f"--only {only}" if only else "all",
    }
    records, waiting = {}, None
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
            elif waiting := planner.waiting(stage):
                logger.info("stage %s: %s", stage, waiting)
                tracking.tag_waiting(parent, waiting)
                break
            else:
                logger.info("stage %s: running %s", stage, spec.fingerprint)
                records[stage] = stage_task(stage)(spec)
            planner.complete(stage, records[stage].digest, records[stage].outputs)
        report.log_report(parent, name, tags, list(records.values()))
    if judged_until is not None and waiting is None and only is None:
        site.store().set_mark(site.queue, TRAINED, judged_until)
    return {
        "pipeline": name, "experiment": experiment, "parent_run": parent, "flow_run": str(flow_run.id),
        "stages": list(records.values()), "waiting": waiting,
    }


def _nothing_new(config: Pipeline, site: Site) -> str | None:
    """Why a scheduled run need not train: fewer new judgements than `schedule.min_new_labels` since the last
    completed run (None before any run has trained on judgements: the first one fills the queue)."""
    needed = config.schedule.min_new_labels if config.schedule else None
    trained = site.store().mark(site.queue, TRAINED) if needed else None
    if trained is None:
        return None
    new = site.store().count_judgements(site.queue, after_id=trained)
    return None if new >= needed else f"nothing new: {new:,} of {needed:,} judgements since the last completed run"
