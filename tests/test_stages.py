"""The stage lifecycle against a real MLflow sqlite store, without Prefect."""

import logging
import threading
from pathlib import Path

import mlflow
import pytest

from rlhf import tracking
from rlhf.config import load_pipeline
from rlhf.errors import StageFailed
from rlhf.lifecycle import StageResult, StageSpec, run_stage


@pytest.fixture
def spec(project: Path, tmp_path: Path):
    home = tmp_path / "home"
    tracking.configure(home)
    experiment = tracking.experiment_id("unit", home)
    parent = mlflow.MlflowClient().create_run(experiment).info.run_id
    _, pipeline = load_pipeline(project / "pipelines.yaml", "tiny")

    def make(force: bool = False) -> StageSpec:
        return StageSpec(home, "tiny", pipeline, "data", {}, {}, {}, experiment, parent, force)

    return make


def write_one(ctx) -> StageResult:
    (ctx.outputs / "x.txt").write_text("x")
    return StageResult(metrics={"rows": 1.0}, headline="rows")


def test_a_failing_recipe_leaves_no_manifest_and_names_the_stage_and_its_work(spec):
    def explode(ctx):
        (ctx.work / "checkpoint-1").mkdir()
        raise RuntimeError("out of memory")

    with pytest.raises(StageFailed, match=r"stage 'data' failed: RuntimeError: out of memory; partial work kept in .*/work"):
        run_stage(spec(), explode)
    assert spec().dir.manifest() is None and (spec().dir.work / "checkpoint-1").exists()
    record = run_stage(spec(), write_one)  # the next attempt continues the same MLflow run
    assert record.action == "resumed"
    assert mlflow.get_run(record.run_id).info.status == "FINISHED"


def test_second_writer_waits_for_the_lock_then_reuses(spec, caplog):
    caplog.set_level(logging.WARNING, logger="rlhf")
    calls, result = [], {}
    lock = spec().dir.lock()
    lock.acquire()
    worker = threading.Thread(target=lambda: result.update(record=run_stage(spec(), lambda ctx: calls.append(1) or write_one(ctx))))
    worker.start()
    worker.join(2)
    assert worker.is_alive() and "busy" in caplog.text  # waiting, and said so
    # the holder finishes the stage while the other waits
    stage_dir = spec().dir
    (stage_dir.new_outputs() / "x.txt").write_text("x")
    stage_dir.complete({"fingerprint": spec().fingerprint, "outputs": {"digest": "d"}, "metrics": {"rows": 1.0},
                        "headline": "rows", "mlflow_run_id": "made-by-other"})
    lock.release()
    worker.join(60)
    assert result["record"].action == "reused" and calls == []
    assert result["record"].source_run_id == "made-by-other"


def test_force_reruns_a_complete_stage(spec):
    assert run_stage(spec(), write_one).action == "ran"
    assert run_stage(spec(), write_one).action == "reused"
    assert run_stage(spec(force=True), write_one).action == "ran"
