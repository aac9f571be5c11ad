"""PPO through the real CLI, Prefect flow, Ray Train (2 workers, gloo) and MLflow store, at tiny scale."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import psutil
import pytest

from conftest import FAST_POLL, Cli, kill_group, registered_checkpoints, wait_for

pytestmark = pytest.mark.slow
PIPELINE = "tiny-ppo"


def ppo_manifest(home: Path) -> dict:
    [path] = (home / "runs" / PIPELINE / "ppo").glob("*/manifest.json")
    return json.loads(path.read_text())


def history(home: Path) -> list[dict]:
    return json.loads((Path(ppo_manifest(home)["outputs"]["path"]) / "history.json").read_text())


def upstream_done(reference_home: Path, home: Path) -> Path:
    """A copy of the reference home without its PPO and evaluation: only PPO runs there (SFT and reward are reused)."""
    shutil.copytree(reference_home, home, ignore=shutil.ignore_patterns("ppo", "evaluate"))
    return home


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted run of the whole tiny pipeline, shared by the tests below."""
    from conftest import HH_FILE, TINY_PIPELINES

    project = tmp_path_factory.mktemp("ppo-project")
    (project / "pipelines.yaml").write_text(TINY_PIPELINES.replace("HH_FILE", str(HH_FILE)))
    (project / "prefs.jsonl").write_text("")
    done = Cli(project, project / "home")("run", PIPELINE, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    return project, project / "home"


def test_full_pipeline_with_two_ray_workers(reference):
    project, home = reference
    manifest = ppo_manifest(home)
    steps = history(home)
    assert [h["iteration"] for h in steps] == list(range(1, 31))
    for key in ("score", "gold", "kl", "beta", "entropy", "policy_clip_fraction", "value_clip_fraction", "approx_kl",
                "ratio_mean", "ratio_var", "value_loss", "policy_loss", "eos_share", "response_length",
                "learning_rate", "non_score_reward", "seconds_generate", "seconds_score", "seconds_train", "seconds_iteration"):
        assert all(key in h for h in steps), key
    assert [h["iteration"] for h in steps if "seconds_setup" in h] == [1]  # set-up is timed once per (re)start
    assert all(math.isfinite(value) for h in steps for value in h.values())
    first = steps[0]
    assert abs(first["kl"]) < 1e-4  # the LoRA policy starts as the reference
    # the first iteration's four steps stay well inside the clip range (0.2); that its first minibatch starts at a
    # ratio of exactly 1 is tests/test_rl_faults.py's. Measured: ratio 0.936, approx-KL 0.14, then within 0.01 of 1
    assert first["ratio_mean"] == pytest.approx(1.0, abs=0.1) and first["approx_kl"] < 0.2
    for key in ("policy_clip_fraction", "value_clip_fraction"):
        assert all(0 <= h[key] <= 1 for h in steps), key
    assert any(h["policy_clip_fraction"] > 0 for h in steps)  # the clipping is exercised, not dead code
    early, late = (sum(h["score"] for h in part) / len(part) for part in (steps[:5], steps[-5:]))
    assert late > early + 0.2, (early, late)  # PPO raises the reward model's score
    outputs = Path(manifest["outputs"]["path"])
    for name in ("adapter/adapter_config.json", "model/config.json", "model/tokenizer_config.json", "critic/config.json"):
        assert (outputs / name).exists(), name
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(manifest["mlflow_run_id"], "ppo/kl")) == 30  # rank 0 only, once per iteration
    samples = client.list_artifacts(manifest["mlflow_run_id"], "ppo/samples")
    assert [Path(a.path).name for a in samples] == ["iteration_0015.json", "iteration_0030.json"]


def test_evaluation_pictures_report_and_registered_policy(reference):
    import matplotlib.image

    project, home = reference
    [path] = (home / "runs" / PIPELINE / "evaluate").glob("*/manifest.json")
    evaluation = json.loads(path.read_text())
    for key in ("baseline.gold_mean", "candidate.gold_mean", "gold_gain", "win_rate_gold", "win_rate_score", "kl_to_baseline",
                "candidate.distinct_1", "candidate.distinct_2", "candidate.eos_share", "candidate.length_words", "reward_hacking"):
        assert key in evaluation["metrics"], key
    assert evaluation["metrics"]["registered_version"] == 1

    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    client = mlflow.MlflowClient()
    run = client.get_run(evaluation["mlflow_run_id"])
    assert run.data.metrics["evaluate.kl_to_baseline"] == pytest.approx(evaluation["metrics"]["kl_to_baseline"])
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "plots")]
    assert set(pictures) == {"plots/ppo_curves.png", "plots/score_distribution.png", "plots/gold_distribution.png",
                             "plots/reward_accuracy.png"}
    for picture in pictures:
        image = matplotlib.image.imread(client.download_artifacts(run.info.run_id, picture))
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    assert [a.path for a in client.list_artifacts(ppo_manifest(home)["mlflow_run_id"], "plots")] == ["plots/ppo_curves.png"]
    parent = run.data.tags["mlflow.parentRunId"]
    report = Path(client.download_artifacts(parent, "report.md")).read_text()
    assert "| evaluate | ran |" in report and evaluation["mlflow_run_id"] in report and "gold reward: SFT" in report

    # the registered policy loads and chats in a process that cannot import this project
    load = (
        "import sys, json, mlflow\n"
        "sys.modules.update(rlhf=None, flows=None, tasks=None)\n"
        f"mlflow.set_tracking_uri('sqlite:///{home}/mlflow.db')\n"
        f"policy = mlflow.pyfunc.load_model('models:/{PIPELINE}-policy@candidate')\n"
        "request = {'messages': [{'role': 'user', 'content': 'Write a review of the lamp.'}], 'max_tokens': 12}\n"
        "print(json.dumps(policy.predict(request)))\n"
    )
    done = subprocess.run([sys.executable, "-c", load], cwd="/", capture_output=True, text=True, timeout=300, env=Cli(project, home).env())
    assert done.returncode == 0, done.stderr[-3000:]
    [answer] = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["choices"][0]["message"]["content"].strip() and answer["usage"]["completion_tokens"] <= 12
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/{PIPELINE}-policy/1", dst_path=str(project / "policy")))
    names = {p.name for p in logged.rglob("*") if p.is_file()}
    assert "model.safetensors" in names and not [n for n in names if n.endswith((".pkl", ".bin", ".pt", ".pth"))], names
    promoted = Cli(project, home)("promote", PIPELINE, "1")
    assert promoted.returncode == 0, promoted.stderr
    assert str(client.get_model_version_by_alias(f"{PIPELINE}-policy", "champion").version) == "1"
    assert Cli(project, home)("promote", PIPELINE, "7").returncode == 2


def test_a_candidate_that_fails_the_gate_is_not_registered(reference):
    project, reference_home = reference
    home = project / "home-gates"
    shutil.copytree(reference_home, home)
    done = Cli(project, home)("run", PIPELINE, "--only", "evaluate", "--set", "stages.evaluate.registry.max_kl=0.0001")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not registered (gates not met)" in done.stdout
    manifests = [json.loads(p.read_text()) for p in (home / "runs" / PIPELINE / "evaluate").glob("*/manifest.json")]
    [rerun] = [m for m in manifests if m["config"]["registry"]["max_kl"] == 0.0001]
    assert rerun["metrics"]["registered_version"] == 0 and rerun["metrics"]["kl_to_baseline"] > 0.0001
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    client = mlflow.MlflowClient()
    assert [int(v.version) for v in client.search_model_versions(f"name='{PIPELINE}-policy'")] == [1]  # the reference run's
    assert client.get_run(rerun["mlflow_run_id"]).data.tags["rlhf.registered"] == "false"


def test_a_killed_run_then_a_killed_worker_of_its_rerun_go_on_to_the_same_history(reference):
    project, reference_home = reference
    cli = Cli(project, upstream_done(reference_home, project / "home-killed"))
    ppo_dir = cli.home / "runs" / PIPELINE / "ppo"
    process = cli.start("run", PIPELINE, **FAST_POLL)
    wait_for(lambda: registered_checkpoints(ppo_dir) or process.poll() is not None, 900, "a registered PPO checkpoint")
    assert process.poll() is None, process.log.read_text()[-4000:]
    kill_group(process)  # the whole run: CLI, Ray and its workers
    crashed_run = next(ppo_dir.glob("*/work/mlflow_run_id")).read_text()

    before = set(registered_checkpoints(ppo_dir))
    rerun = cli.start("run", PIPELINE, **FAST_POLL)
    wait_for(lambda: set(registered_checkpoints(ppo_dir)) - before or rerun.poll() is not None, 900, "a checkpoint of the rerun")
    workers = [p for p in psutil.Process(rerun.pid).children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    assert workers and rerun.poll() is None, "no Ray Train worker process of the rerun found"
    os.kill(workers[-1].pid, signal.SIGKILL)  # one worker of the resumed run: Ray Train restarts the group
    assert rerun.wait(timeout=900) == 0, rerun.log.read_text()[-4000:]

    assert ppo_manifest(cli.home)["mlflow_run_id"] == crashed_run
    steps, straight = history(cli.home), history(reference_home)
    assert [h["iteration"] for h in steps] == list(range(1, 31))
    assert max(h["restored_from"] for h in steps) >= 10  # the worker group restarted from the rerun's checkpoint
    assert len([h for h in steps if "seconds_setup" in h]) == 3  # the first run, its resumption, the restart
    for got, want in zip(steps, straight):  # and went on as if nothing had died
        for key in ("policy_loss", "score", "kl", "value_loss", "reward_total"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["iteration"], key)


def test_the_dashboard_shows_the_run_through_the_rest_api(reference):
    """`rlhf ui` over the home: the parent run's headline metrics and description, the experiment's view,
    each stage's log, read as the browser reads them; stopping it stops every process it started."""
    import socket
    import time

    import requests

    project, home = reference
    evaluation = json.loads(next((home / "runs" / PIPELINE / "evaluate").glob("*/manifest.json")).read_text())
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "flows", "--home", str(home), "ui", "--port", str(port)], cwd=project,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=Cli(project, home).env())
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"

    def up() -> bool:
        try:
            return requests.get(f"{api}/experiments/search?max_results=10", timeout=2).ok
        except requests.ConnectionError:
            return False

    try:
        wait_for(up, 120, "the MLflow UI")
        started = psutil.Process(ui.pid).children(recursive=True)
        experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "tests-ppo"}).json()["experiment"]
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
        parent_id = client_parent(home, evaluation["mlflow_run_id"])
        parent = requests.get(f"{api}/runs/get", params={"run_id": parent_id}).json()["run"]["data"]
        metrics = {m["key"]: m["value"] for m in parent["metrics"]}
        tags = {t["key"]: t["value"] for t in parent["tags"]}
        for stage in ("data", "sft", "reward", "ppo", "evaluate"):
            assert metrics[f"{stage}.seconds"] > 0, stage
        for name in ("gold_gain", "win_rate_gold", "win_rate_score", "kl_to_baseline"):
            assert metrics[f"evaluate.{name}"] == pytest.approx(evaluation["metrics"][name]), name
        assert metrics["reward.eval_accuracy"] > 0.55 and metrics["sft.eval_loss"] > 0
        assert tags["mlflow.note.content"].startswith(f"# Pipeline `{PIPELINE}`") and "| evaluate | ran |" in tags["mlflow.note.content"]
        artifacts = requests.get(f"{api}/artifacts/list", params={"run_id": ppo_manifest(home)["mlflow_run_id"]}).json()
        assert "stage.log" in [f["path"] for f in artifacts["files"]]
    finally:
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
    time.sleep(1)
    assert len(started) >= 2 and not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def client_parent(home: Path, run_id: str) -> str:
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    return mlflow.MlflowClient().get_run(run_id).data.tags["mlflow.parentRunId"]


CRITIC_FREE = {"grpo": 10, "rloo": 20, "reinforce": 20}  # the RL methods without a critic, and their iterations


@pytest.mark.parametrize("method", ["grpo", "rloo", "reinforce", "dpo"])
def test_another_method_reuses_the_stages_of_another_pipeline_and_is_evaluated(reference, method):
    project, home = reference
    cli = Cli(project, home)
    done = cli("run", f"tiny-{method}", timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {cells[1].strip(): cells[2].strip() for cells in (line.split("│") for line in done.stdout.splitlines())
            if len(cells) == 7 and cells[1].strip()}
    assert rows == {"data": "reused", "sft": "reused", "reward": "reused", method: "ran", "evaluate": "ran"}, done.stdout
    status = cli("status", f"tiny-{method}")
    assert status.stdout.count("complete (from tiny-ppo)") == 3, status.stdout

    [path] = (home / "runs" / f"tiny-{method}" / method).glob("*/manifest.json")
    made = json.loads(path.read_text())
    outputs = Path(made["outputs"]["path"])
    assert (outputs / "model" / "config.json").exists() and (outputs / "mlflow_model.json").exists()
    assert not (outputs / "critic").exists()  # neither loads nor saves a critic
    [path] = (home / "runs" / f"tiny-{method}" / "evaluate").glob("*/manifest.json")
    evaluation = json.loads((Path(json.loads(path.read_text())["outputs"]["path"]) / "evaluation.json").read_text())
    assert (evaluation["candidate"], evaluation["baseline"]) == (method, "sft")
    # the candidate is not the baseline. Not its sign: ENGINE BUG (reported, not fixed here) the evaluation's KL
    # scores the responses decoded and re-rendered, not the sampled tokens; this tiny model's byte tokens do not
    # survive that round trip, and REINFORCE++ here measured -0.42 where its sampled tokens give +0.67
    assert abs(evaluation["metrics"]["kl_to_baseline"]) > 0.0001 and math.isfinite(evaluation["metrics"]["score_gain"])
    mlflow.set_tracking_uri(f"sqlite:///{home}/mlflow.db")
    metrics = mlflow.MlflowClient().get_run(made["mlflow_run_id"]).data.metrics
    if method in CRITIC_FREE:
        steps = json.loads((outputs / "history.json").read_text())
        assert len(steps) == CRITIC_FREE[method] and all("value_loss" not in h for h in steps)
        assert all(("kl_loss" in h) == (method == "grpo") for h in steps)  # GRPO's KL is a loss term, the others' a penalty
        assert abs(steps[0]["kl"]) < 1e-4 and steps[0]["ratio_mean"] == pytest.approx(1.0, abs=0.05)
        assert ("grpo/kl_loss" in metrics) == (method == "grpo")
    if method in ("rloo", "reinforce"):
        # The reward model's score rises. An iteration's 32 responses are noisy, and the prompts drawn move its
        # mean as much as learning does, so each bound was measured learning and not learning (learning rate 1e-9:
        # the same prompts and seeds). The last 10 iterations against the first 3 (as the PPO test compares them)
        # and against the starting policy's mean over its 256 normalisation samples; the evaluation's score gain
        # on held-out prompts (the same prompts and seeds for both policies, in the starting policy's std):
        #                     learning: late - early, late - start, gain   not learning: the same
        #   RLOO, seed 0      +0.21 (+0.38), +0.67 (+0.74), 0.34 (0.22)    -0.22, -0.02, 0
        #   RLOO, seed 1      +0.43, +0.73, 0.18                           +0.02, +0.16, 0
        #   REINFORCE++, 0    +0.48 (+0.56), +0.78 (+0.88), 0.31 (0.44)    +0.07, +0.11, 0
        #   REINFORCE++, 1    +0.39, +0.76, 0.18                           +0.13, +0.25, 0
        # (in brackets, and seed 0 not learning: an earlier build of the upstream stages). Not learning, the first
        # iterations' mean still rose by up to 0.13: that comparison checks the direction only, the other two
        # tell learning from chance.
        early, late = (sum(h["score"] for h in part) / len(part) for part in (steps[:3], steps[-10:]))
        start = json.loads((outputs / "normalisation.json").read_text())
        assert start["count"] == 256
        assert late > early and late > start["mean"] + 0.4, (early, late, start)
        assert evaluation["metrics"]["score_gain"] > 0.1, evaluation["metrics"]
    elif method == "dpo":
        assert made["metrics"]["train_steps"] == 8 and made["metrics"]["train_pairs"] == 32
        # the first step's loss is log 2 (the policy is its reference); learning takes the mean below it
        assert made["metrics"]["train_loss"] < math.log(2) and "dpo.eval_loss" in metrics
