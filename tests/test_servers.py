"""The operations path against real servers on 127.0.0.1, started by `infra/local-up` and stopped by
`infra/local-down`: PostgreSQL, a Prefect server and an MLflow tracking server on it, and a two-node
Ray cluster. `rlhf serve` registers the scheduled deployment; one run triggered through the Prefect
API runs the tiny pipeline with SFT, reward and PPO workers on both Ray nodes, tracked by the MLflow
server."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from conftest import HH_FILE, ROOT, TINY_PIPELINES, Cli, PrefectApi, kill_group

pytestmark = pytest.mark.slow
PIPELINE = "tiny-served"
# tiny-ppo's stages on both Ray nodes at smoke scale: what is checked here is where and how they ran, not learning
SERVED = """
  tiny-served:
    tracking: {experiment: tests-served}
    seed: 0
    schedule: {cron: "0 0 1 1 *", timezone: Europe/Berlin}  # registered by these tests, never due in them
    ray: *two-workers
    stages:
      <<: *train
      sft: *sft60
      ppo: {learning_rate: 0.003, iterations: 4, batch_size: 8, minibatches: 2, epochs: 1, max_new_tokens: 12,
            checkpoint_every: 2}
      evaluate: *tiny-evaluate
"""
STAGES = ["data", "sft", "reward", "ppo", "evaluate"]
PORTS = {"RLHF_POSTGRES_PORT": "55433", "RLHF_PREFECT_PORT": "54200", "RLHF_MLFLOW_PORT": "55000", "RLHF_RAY_PORT": "56380"}


@pytest.fixture(scope="module")
def servers():
    """`infra/local-up` in a fresh directory (PostgreSQL runs as user postgres, who must reach it)."""
    directory = Path(tempfile.mkdtemp(prefix="rlhf-infra-", dir="/tmp"))
    directory.chmod(0o755)
    env = os.environ | PORTS
    up = subprocess.run([ROOT / "infra" / "local-up", "--dir", directory], capture_output=True, text=True, env=env, timeout=600)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert (directory / "postgres.password").stat().st_mode & 0o777 == 0o600  # the generated password
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", up.stdout, re.M))
        assert exports == dict(re.findall(r"^export (\w+)=(\S+)$", (directory / "env").read_text(), re.M))
        yield exports
    finally:
        down = subprocess.run([ROOT / "infra" / "local-down", "--dir", directory], capture_output=True, text=True, env=env, timeout=300)
        leftovers = [p for p in Path("/proc").glob("[0-9]*/cmdline") if _mentions(p, str(directory))]
        shutil.rmtree(directory, ignore_errors=True)
        assert down.returncode == 0, down.stderr[-3000:]
        assert not leftovers, "local-down left processes running"


def _mentions(cmdline: Path, text: str) -> bool:
    try:
        return text in cmdline.read_bytes().decode(errors="replace")
    except OSError:
        return False


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("ops-project")
    (project / "pipelines.yaml").write_text(TINY_PIPELINES.replace("HH_FILE", str(HH_FILE)) + SERVED)
    (project / "prefs.jsonl").write_text("")
    return project


@pytest.fixture(scope="module")
def scheduled(servers, project):
    """`rlhf serve` running; one run of its deployment triggered through the Prefect API and finished."""
    api = PrefectApi(servers["PREFECT_API_URL"])
    cli = Cli(project, project / "home")
    serving = cli.start("serve", PIPELINE, **servers)
    try:
        deployment = api.served(PIPELINE, serving)
        run = api.triggered_run(deployment, 1200)
        yield {"api": api, "cli": cli, "deployment": deployment, "run": run,
               "serve_log": serving.log}
    finally:
        kill_group(serving)


def flow_runs(api: PrefectApi) -> list[dict]:
    return api("POST", "/flow_runs/filter", json={"sort": "START_TIME_DESC"})


def test_serve_registers_the_schedule_and_the_triggered_run_completes(scheduled):
    deployment, run = scheduled["deployment"], scheduled["run"]
    assert run["state"]["type"] == "COMPLETED", scheduled["serve_log"].read_text()[-4000:]
    [schedule] = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 0 1 1 *" and schedule["schedule"]["timezone"] == "Europe/Berlin"
    assert schedule["active"] and schedule["slug"] == f"{PIPELINE}-schedule"
    assert deployment["concurrency_limit"] == 1 or deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["parameters"]["pipeline"] == PIPELINE
    listed = {r["id"]: r["state"]["type"] for r in flow_runs(scheduled["api"])}
    assert listed[run["id"]] == "COMPLETED"


def test_the_run_is_tracked_by_the_mlflow_server(servers, scheduled):
    mlflow = httpx.Client(base_url=servers["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow", timeout=30)
    experiment = mlflow.get("/experiments/get-by-name", params={"experiment_name": "tests-served"}).json()["experiment"]
    runs = mlflow.post("/runs/search", json={"experiment_ids": [experiment["experiment_id"]], "max_results": 100}).json()["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    [parent] = [i for i, t in tags.items() if t.get("rlhf.prefect_flow_run_id") == scheduled["run"]["id"]]
    children = {t["rlhf.stage"]: i for i, t in tags.items() if t.get("mlflow.parentRunId") == parent}
    assert sorted(children) == sorted(STAGES)
    for run_id in (parent, children["data"], children["ppo"]):
        assert mlflow.get("/artifacts/list", params={"run_id": run_id}).json().get("files"), run_id
    kl = mlflow.get("/metrics/get-history", params={"run_id": children["ppo"], "metric_key": "ppo/kl"}).json()["metrics"]
    assert len(kl) == 4


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_training_workers_ran_on_both_ray_nodes(scheduled, stage):
    [log] = (scheduled["cli"].home / "runs" / PIPELINE / stage).glob("*/stage.log")  # where what workers print goes
    nodes = dict(re.findall(rf"{stage}(?:-\w+)?: worker (\d) of 2 on Ray node (\w+)", log.read_text()))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"]


def test_cli_rerun_over_the_servers_is_a_new_flow_run_and_parent_run(servers, scheduled):
    before = {r["id"] for r in flow_runs(scheduled["api"])}
    rerun = scheduled["cli"]("run", PIPELINE, "--only", "reward", **servers)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"│ reward\s+│ reused", rerun.stdout)
    [new] = [r for r in flow_runs(scheduled["api"]) if r["id"] not in before]
    assert new["state"]["type"] == "COMPLETED" and new["id"] in rerun.stdout.replace("\n", "")
    assert servers["MLFLOW_TRACKING_URI"] in rerun.stdout


def test_infra_prefect_yaml_deploys_to_a_process_pool(servers):
    env = os.environ | {"PREFECT_API_URL": servers["PREFECT_API_URL"]}
    prefect = str(Path(sys.executable).parent / "prefect")
    for command in (["work-pool", "create", "rlhf-process", "--type", "process", "--overwrite"],
                    ["deploy", "--prefect-file", "infra/prefect.yaml", "--all"]):
        done = subprocess.run([prefect, "--no-prompt", *command], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deployment = PrefectApi(servers["PREFECT_API_URL"])("GET", "/deployments/name/rlhf-pipeline/demo-pool")
    assert deployment["work_pool_name"] == "rlhf-process" and deployment["entrypoint"] == "flows/pipeline.py:pipeline_flow"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * *"]


def test_more_workers_than_the_existing_cluster_has_waits_then_exits_2(servers, project):
    cli = Cli(project, project / "home-too-many-workers")
    waited = cli("run", PIPELINE, "--set", "ray.num_workers=8", "--set", "stages.ppo.minibatches=1", "--set",
                 "ray.wait_seconds=20", timeout=300, **servers)
    assert waited.returncode == 2, waited.stderr[-3000:]
    assert "waiting for the Ray cluster at" in waited.stderr and "room for" in waited.stderr
    message = waited.stderr.strip().splitlines()[-1]
    assert "ray.num_workers=8" in message and "after 20 s (ray.wait_seconds)" in message and "on 2 nodes" in message
    assert not list(cli.home.glob("runs/*/*/*/manifest.json"))
