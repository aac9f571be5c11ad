"""SFT and reward stages through the real CLI, Prefect flow, TRL trainers (in-process and on Ray Train) and MLflow
store, at tiny scale."""

import json
import math
import re
import time
from pathlib import Path

import mlflow
import pytest

from conftest import FAST_POLL, kill_group, registered_checkpoints, wait_for
from rlhf import models

pytestmark = pytest.mark.slow


def manifest(home: Path, stage: str, pipeline: str = "tiny-rlhf") -> dict:
    [path] = (home / "runs" / pipeline / stage).glob("*/manifest.json")
    return json.loads(path.read_text())


def actions(stdout: str) -> dict[str, str]:
    rows = [line.split("│") for line in stdout.splitlines() if line.startswith("│ ") and line.count("│") == 6]
    return {cells[1].strip(): cells[2].strip() for cells in rows if cells[1].strip()}


def test_sft_and_reward_run_reuse_and_rerun_what_changed(cli):
    first = cli("run", "tiny-rlhf")
    assert first.returncode == 0, first.stderr[-3000:]
    assert actions(first.stdout) == {"data": "ran", "sft": "ran", "reward": "ran"}
    sft, reward = manifest(cli.home, "sft"), manifest(cli.home, "reward")
    assert sft["metrics"]["eval_loss"] < sft["metrics"]["eval_loss_first"]
    assert sft["metrics"]["train_steps"] == 30 and sft["metrics"]["train_tokens_per_second"] > 0
    assert reward["metrics"]["eval_pairs"] == 24
    # trained, it ranks held-out pairs better than chance and than its untrained head (flipped labels would not)
    assert reward["metrics"]["eval_accuracy"] > max(0.5, reward["metrics"]["eval_accuracy_before"])
    assert reward["inputs"]["sft"] == sft["outputs"]["digest"]
    outputs = Path(reward["outputs"]["path"])
    reward_model = models.load_reward_model(outputs / "model")
    assert reward_model.config.num_labels == 1
    assert reward_model.config.pad_token_id == models.load_tokenizer(outputs / "model").pad_token_id
    assert models.load_tokenizer(Path(sft["outputs"]["path"]) / "model").chat_template == models.CHAT_TEMPLATE

    mlflow.set_tracking_uri(f"sqlite:///{cli.home}/mlflow.db")
    client = mlflow.MlflowClient()
    sft_run = client.get_run(sft["mlflow_run_id"])
    assert sft_run.data.params["cfg.learning_rate"] == "0.003"
    assert sft_run.data.params["learning_rate"] == "0.003"  # transformers' own callback logged into our run
    # auto: a scratch model computes in fp32 on any hardware
    assert (sft_run.data.params["cfg.precision"], sft_run.data.params["precision_chosen"]) == ("auto", "fp32")
    evaluated = sorted(m.step for m in client.get_metric_history(sft_run.info.run_id, "eval_loss"))
    assert evaluated == [10, 20, 30]  # the final evaluation is the schedule's at step 30, not run a second time
    assert "samples/sft_generations.json" in [a.path for a in client.list_artifacts(sft_run.info.run_id, "samples")]
    reward_artifacts = [a.path for a in client.list_artifacts(reward["mlflow_run_id"], "reward")]
    assert "reward/held_out_pairs.json" in reward_artifacts
    assert len(mlflow.search_runs(experiment_names=["tests-rlhf"], output_format="list")) == 4  # no stray runs

    changed = cli("run", "tiny-rlhf", "--set", "stages.sft.learning_rate=0.002")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert actions(changed.stdout) == {"data": "reused", "sft": "ran", "reward": "ran"}

    newest_reward = lambda: max(  # noqa: E731
        (json.loads(p.read_text()) for p in (cli.home / "runs" / "tiny-rlhf" / "reward").glob("*/manifest.json")),
        key=lambda m: m["finished_at"],
    )
    changed_reward = newest_reward()
    again = cli("run", "tiny-rlhf", "--set", "stages.sft.learning_rate=0.002", "--from", "reward")
    assert again.returncode == 0, again.stderr[-3000:]
    assert actions(again.stdout) == {"data": "reused", "sft": "reused", "reward": "ran"}
    # the same seed and inputs give the same reward model, head initialisation included
    assert newest_reward()["outputs"]["digest"] == changed_reward["outputs"]["digest"]

    blocked = cli("run", "tiny-rlhf", "--set", "stages.sft.learning_rate=0.001", "--only", "reward")
    assert blocked.returncode == 2
    assert "upstream stage 'sft' is not complete" in blocked.stderr.strip().splitlines()[-1]


def _kill_after_first_checkpoint(cli, stage: str, *args: str) -> tuple[str, str]:
    """Start a run, SIGKILL it once `stage` has a complete checkpoint; return that attempt's MLflow run id and
    what the run printed."""
    process = cli.start("run", "tiny-rlhf", *args)
    stage_dir = cli.home / "runs" / "tiny-rlhf" / stage
    checkpoints = lambda: list(stage_dir.glob("*/work/trainer/rank-0/checkpoint-*.sha256"))  # noqa: E731  (sealed: complete)
    wait_for(lambda: checkpoints() or process.poll() is not None, 600, f"a {stage} checkpoint")
    assert process.poll() is None, process.log.read_text()[-3000:]
    kill_group(process)
    assert not list(stage_dir.glob("*/manifest.json"))
    return next(stage_dir.glob("*/work/mlflow_run_id")).read_text(), process.log.read_text()


def test_sft_then_reward_killed_after_a_checkpoint_each_resume_to_the_uninterrupted_result(cli, project):
    longer = ["--set", "stages.sft.max_steps=80", "--set", "stages.reward.max_steps=60"]
    sft_run, _ = _kill_after_first_checkpoint(cli, "sft", *longer)
    reward_run, second_attempt = _kill_after_first_checkpoint(cli, "reward", *longer)  # SFT resumed and completed first
    assert re.search(r"resuming from \S*/sft/\S*/checkpoint-", second_attempt), second_attempt[-3000:]
    sft = manifest(cli.home, "sft")
    assert sft["mlflow_run_id"] == sft_run and sft["resumed"]
    assert sft["metrics"]["resumed_from_step"] >= 5 and sft["metrics"]["train_steps"] == 80

    rerun = cli("run", "tiny-rlhf", *longer)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert actions(rerun.stdout) == {"data": "reused", "sft": "reused", "reward": "resumed"}
    reward = manifest(cli.home, "reward")
    assert reward["mlflow_run_id"] == reward_run and reward["resumed"]
    assert reward["metrics"]["resumed_from_step"] >= 4 and reward["metrics"]["train_steps"] == 60

    straight = type(cli)(project, project / "home-2")("run", "tiny-rlhf", *longer)
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference_sft, reference_reward = manifest(project / "home-2", "sft"), manifest(project / "home-2", "reward")
    assert sft["fingerprint"] == reference_sft["fingerprint"]
    assert sft["metrics"]["eval_loss"] == pytest.approx(reference_sft["metrics"]["eval_loss"], abs=1e-3)
    assert reward["fingerprint"] == reference_reward["fingerprint"] and reward["inputs"] == reference_reward["inputs"]
    # the same pairs, ranked the same: the resumed model scores held-out pairs as the uninterrupted one
    assert reward["metrics"]["eval_accuracy"] == reference_reward["metrics"]["eval_accuracy"]
    assert reward["metrics"]["eval_accuracy"] > max(0.5, reward["metrics"]["eval_accuracy_before"])


def test_sft_on_ray_train_killed_after_a_checkpoint_resumes_in_the_same_mlflow_run(cli):
    on_ray = ["--set", "ray.num_workers=2", "--set", "ray.cpus_per_worker=1", "--set", "stages.sft.max_steps=60"]
    stage_dir = cli.home / "runs" / "tiny-rlhf" / "sft"
    process = cli.start("run", "tiny-rlhf", *on_ray, **FAST_POLL)
    wait_for(lambda: registered_checkpoints(stage_dir) or process.poll() is not None, 900, "a registered SFT checkpoint")
    assert process.poll() is None, process.log.read_text()[-3000:]
    kill_group(process)
    assert not list(stage_dir.glob("*/manifest.json"))
    crashed_run = next(stage_dir.glob("*/work/mlflow_run_id")).read_text()

    rerun_started_ms = time.time() * 1000
    rerun = cli("run", "tiny-rlhf", *on_ray, "--only", "sft", timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert actions(rerun.stdout) == {"data": "reused", "sft": "resumed"}
    # what Ray's workers print goes to the stage's log, not the console; the log has a part per attempt
    rerun_log = next(stage_dir.glob("*/stage.log")).read_text().split("attempt started")[-1]
    assert re.search(r"resuming from .*/work/ray/sft-\w+/checkpoint_", rerun_log)
    assert set(re.findall(r"sft-\w+: worker (\d) of 2", rerun_log)) == {"0", "1"}
    assert "worker 0 of 2" not in rerun.stdout + rerun.stderr
    resumed = manifest(cli.home, "sft")
    assert resumed["mlflow_run_id"] == crashed_run
    assert resumed["metrics"]["resumed_from_step"] >= 5 and resumed["metrics"]["train_steps"] == 60
    assert resumed["metrics"]["eval_loss"] < resumed["metrics"]["eval_loss_first"]

    mlflow.set_tracking_uri(f"sqlite:///{cli.home}/mlflow.db")
    client = mlflow.MlflowClient()
    run = client.get_run(crashed_run)
    assert run.data.params["per_device_train_batch_size"] == "8"  # batch_size 16 is the step's batch over both workers
    steps = [m.step for m in client.get_metric_history(crashed_run, "loss") if m.timestamp >= rerun_started_ms]
    first = int(resumed["metrics"]["resumed_from_step"]) + 5
    assert sorted(steps) == list(range(first, 61, 5))  # logged once per logging step, by rank 0 only


def test_reward_model_on_real_hh_rlhf_dialogues(cli):
    done = cli("run", "hh-tiny")
    assert done.returncode == 0, done.stderr[-3000:]
    data, reward = manifest(cli.home, "data", "hh-tiny"), manifest(cli.home, "reward", "hh-tiny")
    assert data["metrics"]["preferences.dropped.identical"] == 6
    kept = data["metrics"]["preferences.train.rows"] + data["metrics"]["preferences.eval.rows"]
    assert 985 <= kept <= 994
    assert reward["metrics"]["train_steps"] == 10
    mlflow.set_tracking_uri(f"sqlite:///{cli.home}/mlflow.db")
    assert "eval_accuracy" in mlflow.get_run(reward["mlflow_run_id"]).data.metrics
    # ten steps teach a scratch model little about real dialogues; what must hold is that it scores them:
    # finite scores that differ between replies, and an accuracy that is the share of pairs they order right
    table = json.loads(Path(mlflow.MlflowClient().download_artifacts(reward["mlflow_run_id"], "reward/held_out_pairs.json")).read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    scores = [r[key] for r in rows for key in ("chosen_score", "rejected_score")]
    assert len(rows) == reward["metrics"]["eval_pairs"] and all(map(math.isfinite, scores)) and len(set(scores)) > len(rows)
    assert reward["metrics"]["eval_accuracy"] == pytest.approx(sum(r["chosen_score"] > r["rejected_score"] for r in rows) / len(rows))
