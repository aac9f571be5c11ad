"""The data stage through the real CLI, the real Prefect flow and a real MLflow sqlite store; the first test's runs
each start Prefect's temporary API, as a run with no PREFECT_API_URL does, the others share the tests' server."""

import json
import os
import sqlite3
from pathlib import Path

import mlflow
import pytest

from conftest import Cli, kill_group, preference_rows, wait_for, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture
def temporary_prefect_cli(project: Path) -> Cli:
    return Cli(project, project / "home", temporary_prefect=True)


def manifests(home: Path, stage: str = "data") -> list[Path]:
    return sorted((home / "runs" / "tiny" / stage).glob("*/manifest.json"))


def runs(home: Path):
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    return mlflow.search_runs(experiment_names=["tests"], output_format="list", order_by=["start_time ASC"])


def test_run_reuse_override_and_tracking(temporary_prefect_cli):
    cli = temporary_prefect_cli
    first = cli("run")
    assert first.returncode == 0, first.stderr
    assert "│ data  │ ran" in first.stdout and "rlhf --home" in first.stdout
    [manifest_path] = manifests(cli.home)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["metrics"]["preferences.train.rows"] + manifest["metrics"]["preferences.eval.rows"] == 20
    assert manifest["versions"]["torch"].startswith("2.")

    again = cli("run", "tiny", "--only", "data")
    assert again.returncode == 0, again.stderr
    assert "│ data  │ reused" in again.stdout
    assert manifest_path.read_text() == json.dumps(manifest, indent=2, sort_keys=True)  # untouched

    status = cli("status")
    assert status.returncode == 0, status.stderr
    assert "complete" in status.stdout and manifest["fingerprint"][:8] in status.stdout

    changed = cli("run", "--set", "stages.data.eval_fraction=0.3")
    assert changed.returncode == 0, changed.stderr
    assert "│ data  │ ran" in changed.stdout
    assert len(manifests(cli.home)) == 2

    recorded = runs(cli.home)
    parents = [r for r in recorded if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in recorded if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 3 and all(r.info.status == "FINISHED" for r in recorded)
    assert {p.data.tags["rlhf.pipeline"] for p in parents} == {"tiny"}
    assert all(p.data.tags["rlhf.prefect_flow_run_id"] for p in parents)
    made = [c for c in children if c.info.run_id == manifest["mlflow_run_id"]][0]
    assert made.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert made.data.params["cfg.eval_fraction"] == "0.2"
    assert {d.dataset.name for d in made.inputs.dataset_inputs} >= {"instructions-train", "preferences-eval"}
    reused = [c for c in children if c.data.tags.get("rlhf.reused") == "true"][0]
    assert reused.data.tags["rlhf.reused_from"] == made.info.run_id
    assert reused.data.tags["mlflow.parentRunId"] == parents[1].info.run_id
    assert parents[1].data.tags["rlhf.reused.data"] == made.info.run_id

    # one flow run per pipeline run, one task run per stage that ran, all completed
    with sqlite3.connect(cli.home / "prefect" / "prefect.db") as db:
        flow_states = db.execute("select state_type from flow_run").fetchall()
        task_runs = db.execute("select name, state_type from task_run").fetchall()
    assert sorted(flow_states) == [("COMPLETED",)] * 3
    assert len(task_runs) == 2 and all(state == "COMPLETED" for _, state in task_runs)


def test_bad_input_exits_2_naming_key_or_file_and_row_and_keeps_completed_work(cli, project):
    unknown = cli("run", "--set", "stages.data.bogus=1")
    assert unknown.returncode == 2
    assert "stages.data.bogus" in unknown.stderr and "allowed keys" in unknown.stderr

    assert cli("run").returncode == 0
    [manifest_path] = manifests(cli.home)
    before = manifest_path.read_text()

    rows = preference_rows()
    del rows[6]["chosen"]
    bad = write_jsonl(project / "bad.jsonl", rows)
    failed = cli("run", "--set", f"stages.data.preferences.path={bad}")
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1] == f"error: {bad}: row 7: missing field 'chosen'"
    console = failed.stdout + failed.stderr
    assert "Traceback" not in console and console.count("row 7: missing field 'chosen'") == 1, console
    assert manifests(cli.home) == [manifest_path] and manifest_path.read_text() == before


def test_sigkill_mid_stage_leaves_no_manifest_and_the_rerun_completes(cli):
    big = ["--set", "stages.data.instructions.examples=150000"]
    process = cli.start("run", *big)
    run_id_files = lambda: list((cli.home / "runs" / "tiny" / "data").glob("*/work/mlflow_run_id"))  # noqa: E731
    wait_for(lambda: run_id_files() or process.poll() is not None, 300, "the data stage to start")
    assert process.poll() is None, process.log.read_text()
    kill_group(process)
    assert not list(cli.home.glob("runs/*/*/*/manifest.json"))  # not even the data stage ran
    crashed_run = run_id_files()[0].read_text()

    rerun = cli("run", *big)
    assert rerun.returncode == 0, rerun.stderr
    assert "│ data  │ resumed" in rerun.stdout
    [manifest_path] = manifests(cli.home)
    assert json.loads(manifest_path.read_text())["mlflow_run_id"] == crashed_run  # same MLflow run continued


def test_more_workers_than_the_local_cluster_holds_exits_2_before_any_stage(cli):
    too_big = cli("run", "tiny-ppo", "--set", "ray.cpus_per_worker=4096", timeout=300)
    assert too_big.returncode == 2
    message = too_big.stderr.strip().splitlines()[-1]
    assert "ray.num_workers=2 workers of ray.cpus_per_worker=4096 CPUs need 8192 CPUs" in message
    assert f"the local Ray cluster has {len(os.sched_getaffinity(0))} CPUs" in message
    assert not list(cli.home.glob("runs/*/*/*/manifest.json"))  # not even the data stage ran
