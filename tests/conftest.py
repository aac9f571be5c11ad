import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = ROOT / "data" / "hh-rlhf-test-1000.jsonl"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

TINY_PIPELINES = """
default: tiny
pipelines:
  tiny:
    description: tiny data for tests
    tracking:
      experiment: tests
    seed: 0
    stages:
      data:
        instructions:
          source: synthetic_reviews
          examples: 300
        preferences:
          source: file
          path: prefs.jsonl
        eval_fraction: 0.2
  tiny-rlhf:
    description: data, sft and reward at test scale
    tracking:
      experiment: tests-rlhf
    seed: 0
    ray: {num_workers: 1, cpus_per_worker: 2}  # SFT and reward train in-process; tiny-ppo trains them on Ray
    stages: &train
      data:
        instructions:
          source: synthetic_reviews
          examples: 600
        eval_fraction: 0.2
      sft: &sft
        model: {init: scratch, vocab_size: 400, hidden_size: 32, layers: 2, heads: 2, intermediate_size: 64}
        learning_rate: 0.003
        batch_size: 16
        max_steps: 30
        eval_steps: 10
        eval_rows: 64
        save_steps: 5
        logging_steps: 5
        samples: 4
        max_new_tokens: 24
      reward:
        pairs: {source: policy, count: 64, eval_count: 24, min_gold_gap: 0.25, max_new_tokens: 24}
        learning_rate: 0.005
        batch_size: 8
        max_steps: 48
        eval_steps: 8
        save_steps: 4
        logging_steps: 4
  tiny-ppo:
    description: the tiny pipeline plus PPO on 2 Ray workers
    tracking:
      experiment: tests-ppo
    seed: 0
    schedule: {cron: "0 0 1 1 *", timezone: Europe/Berlin}  # registered by the server tests, never due in them
    ray: &two-workers
      num_workers: 2
    stages:
      <<: *train
      sft: &sft60 {<<: *sft, max_steps: 60}  # samples the reward model tells apart (held-out accuracy ~0.7)
      ppo:
        learning_rate: 0.003  # PPO raises the reward model's score within the 30 iterations
        iterations: 30
        batch_size: 8
        minibatches: 2
        epochs: 2
        max_new_tokens: 12
        checkpoint_every: 5
        samples_every: 15
      evaluate: &tiny-evaluate
        prompts: 16
        max_new_tokens: 12
        registry: {min_win_rate: 0.0, max_kl: 1000}
  tiny-grpo:
    description: tiny-ppo's stages (reused from it) and GRPO instead of PPO
    tracking: {experiment: tests-ppo}
    ray: *two-workers
    stages:
      <<: *train
      sft: *sft60
      grpo: {learning_rate: 0.003, iterations: 10, batch_size: 4, samples_per_prompt: 2, minibatches: 1, epochs: 2,
             max_new_tokens: 12, checkpoint_every: 5}
      evaluate: *tiny-evaluate
  tiny-rloo:
    description: tiny-ppo's stages (reused from it) and RLOO instead of PPO
    tracking: {experiment: tests-ppo}
    ray: *two-workers
    stages:
      <<: *train
      sft: *sft60
      # 32 responses an iteration and 256 normalisation samples: enough that the reward model's score rises
      # with margin over the noise of sampling and of the prompts drawn (tests/test_ppo_stage.py)
      rloo: {learning_rate: 0.003, iterations: 20, batch_size: 16, samples_per_prompt: 2, minibatches: 1, epochs: 2,
             max_new_tokens: 12, normalisation_samples: 256, checkpoint_every: 10}
      evaluate: *tiny-evaluate
  tiny-reinforce:
    description: tiny-ppo's stages (reused from it) and REINFORCE++ instead of PPO
    tracking: {experiment: tests-ppo}
    ray: *two-workers
    stages:
      <<: *train
      sft: *sft60
      # as tiny-rloo's: 32 responses an iteration, 256 normalisation samples
      reinforce: {learning_rate: 0.003, iterations: 20, batch_size: 32, minibatches: 1, epochs: 2, max_new_tokens: 12,
                  normalisation_samples: 256, checkpoint_every: 10}
      evaluate: *tiny-evaluate
  tiny-dpo:
    description: tiny-ppo's stages (reused from it) and on-policy DPO on Ray Train instead of PPO
    tracking: {experiment: tests-ppo}
    ray: *two-workers
    stages:
      <<: *train
      sft: *sft60
      dpo: {pairs: {source: policy, count: 32, eval_count: 8, max_new_tokens: 12}, learning_rate: 0.003, batch_size: 8,
            max_steps: 8, eval_steps: 4, save_steps: 4, logging_steps: 2, eval_rows: 8}
      evaluate: *tiny-evaluate
  tiny-human:
    description: people in the loop at test scale; tests judge its queue through the page (tests/test_human_loop.py)
    tracking: {experiment: tests-human}
    seed: 0
    ray: {num_workers: 1, cpus_per_worker: 2}
    schedule: {cron: "0 0 1 1 *", min_new_labels: 10}  # runs are triggered by the test, never due in it
    stages:
      data: {instructions: {source: synthetic_reviews, examples: 600}, eval_fraction: 0.2}
      sft: *sft
      propose: {count: 40, eval_count: 12, overlap: 0.2, gold_checks: 4, max_new_tokens: 16}
      reward:
        pairs: {source: labels, count: 12}
        learning_rate: 0.005
        batch_size: 8
        max_steps: 8
        eval_steps: 4
        save_steps: 4
        logging_steps: 4
      ppo: {learning_rate: 0.003, iterations: 2, batch_size: 8, epochs: 1, max_new_tokens: 12, checkpoint_every: 2}
      evaluate:
        prompts: 16
        max_new_tokens: 12
        registry: {min_win_rate: 0.0, max_kl: 1000, min_human_win_rate: 0.6, min_human_judgements: 6, human_pairs: 8}
  hh-tiny:
    description: the real-data path on the shipped HH-RLHF sample, tiny model, few steps
    tracking:
      experiment: tests-hh
    seed: 0
    ray: {num_workers: 1, cpus_per_worker: 2}
    stages:
      data:
        preferences:
          source: file
          path: HH_FILE
          on_invalid: drop
        eval_fraction: 0.1
      reward:
        model: {init: scratch, vocab_size: 512, hidden_size: 32, layers: 2, heads: 2, intermediate_size: 64}
        pairs: {source: data}
        learning_rate: 0.001
        batch_size: 8
        max_steps: 10
        max_length: 256
        eval_steps: 10
        eval_rows: 32
        save_steps: 10
        logging_steps: 5
"""


def preference_rows(n: int = 20) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": [{"role": "assistant", "content": f"A good answer to {i}."}],
            "rejected": [{"role": "assistant", "content": f"A bad answer to {i}."}],
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory with a tiny pipelines.yaml and its preference file."""
    (tmp_path / "pipelines.yaml").write_text(TINY_PIPELINES.replace("HH_FILE", str(HH_FILE)))
    write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    return tmp_path


class Cli:
    """Runs `rlhf` as a user would: a separate process, in the project directory.

    Its runs share one Prefect server (`prefect_api`); with `temporary_prefect` each starts Prefect's
    temporary API instead, as a run with no PREFECT_API_URL does."""

    def __init__(self, cwd: Path, home: Path, temporary_prefect: bool = False):
        self.cwd, self.home, self.temporary_prefect = cwd, home, temporary_prefect

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "flows", "--home", str(self.home), *args]

    def env(self) -> dict[str, str]:
        """This process's environment without the MLflow URI that `mlflow.set_tracking_uri` exports,
        so each run uses its own home's store."""
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        return env if self.temporary_prefect else env | {"PREFECT_API_URL": prefect_api()}

    def __call__(self, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.command(*args), cwd=self.cwd, capture_output=True, text=True, timeout=timeout, env=self.env() | env
        )

    def start(self, *args: str, **env: str) -> subprocess.Popen:
        """A run in the background; its output goes to `process.log` (a pipe nobody reads would stall it)."""
        log = self.home.parent / f"{self.home.name}.log"
        self.home.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            process = subprocess.Popen(
                self.command(*args), cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                text=True, start_new_session=True, env=self.env() | env,
            )
        process.log = log
        return process


@pytest.fixture
def cli(project: Path) -> Cli:
    return Cli(project, project / "home")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, object, list]:
    """A 2-layer scratch model with its left-padding tokenizer, and four chat prompts, for PPO unit tests."""
    from rlhf import models
    from rlhf.blocks import ScratchModel
    from rlhf.synthetic_reviews import generate_examples

    examples = generate_examples(300, 0.25, seed=0)
    tokenizer = models.train_tokenizer((e["prompt"] + " " + e["completion"] for e in examples), 400)
    tokenizer.padding_side = "left"
    config = ScratchModel(init="scratch", vocab_size=400, hidden_size=32, layers=2, heads=2, intermediate_size=64)
    directory = tmp_path_factory.mktemp("tiny")
    models.build_model(config, tokenizer, seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, tokenizer, [[{"role": "user", "content": e["prompt"]}] for e in examples[:4]]


# Ray Train's controller registers a reported checkpoint at its next poll of the workers (every 0.25 s as
# `rlhf` starts Ray); only a registered checkpoint is restored. The tiny runs checkpoint faster than that.
FAST_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


def registered_checkpoints(stage_dir: Path) -> list[str]:
    """Checkpoints Ray Train will restore after a crash: those in its checkpoint manager's snapshot."""
    snapshots = list(stage_dir.glob("*/work/ray/*/checkpoint_manager_snapshot.json"))
    try:
        return [r["checkpoint_dir_name"] for s in snapshots for r in json.loads(s.read_text())["checkpoint_results"]]
    except (json.JSONDecodeError, OSError):  # caught mid-write
        return []


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the CLI and everything it started (Prefect server, Ray processes), like a crash."""
    import psutil

    descendants = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:  # Ray starts some of its processes in sessions of their own
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)


_PREFECT: dict = {}


def prefect_api() -> str:
    """The URL of a Prefect server that lives as long as the test session, started on first use.

    Every `rlhf run` would otherwise start Prefect's temporary API (about 5 s of a run on 2 cores, and a
    time-out when the machine is busy); tests/test_pipeline_flow.py keeps that path covered."""
    if "url" not in _PREFECT:
        directory = Path(tempfile.mkdtemp(prefix="rlhf-tests-prefect-"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = subprocess.Popen(
            [Path(sys.executable).parent / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=os.environ | {"PREFECT_HOME": str(directory)}, stdout=(directory / "server.log").open("w"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        atexit.register(_stop_prefect, server, directory)
        url = f"http://127.0.0.1:{port}/api"
        wait_for(lambda: _answers(url) or server.poll() is not None, 180, "the tests' Prefect server")
        assert server.poll() is None, (directory / "server.log").read_text()[-3000:]
        _PREFECT["url"] = url
    return _PREFECT["url"]


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _stop_prefect(server: subprocess.Popen, directory: Path) -> None:
    kill_group(server)
    shutil.rmtree(directory, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class PrefectApi:
    """Prefect's REST API as the scheduler's side of a test sees it: a served deployment, runs of it triggered
    as its schedule would. A run's own requests share the server's SQLite database, so a request may meet a
    busy moment (a 5xx answer), which is retried rather than read as the answer."""

    def __init__(self, url: str):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=30)

    def __call__(self, method: str, path: str, **kwargs) -> dict | list:
        for attempt in range(5):
            response = self.client.request(method, path, **kwargs)
            if response.status_code < 500:
                break
            time.sleep(2 * (attempt + 1))
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text[:2000]}"
        return response.json()

    def served(self, pipeline: str, serving: subprocess.Popen) -> dict:
        """The deployment `rlhf serve` registered for the pipeline, once it is there."""
        path = f"/deployments/name/rlhf-pipeline/{pipeline}"
        wait_for(lambda: self.client.get(path).status_code == 200 or serving.poll() is not None, 300, "the served deployment")
        assert serving.poll() is None, serving.log.read_text()[-3000:]
        return self("GET", path)

    def triggered_run(self, deployment: dict, timeout: float) -> dict:
        """A run of the deployment, created as its schedule would create it, once it has ended."""
        run = self("POST", f"/deployments/{deployment['id']}/create_flow_run", json={})
        wait_for(lambda: self("GET", f"/flow_runs/{run['id']}")["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED"),
                 timeout, "the triggered flow run")
        return self("GET", f"/flow_runs/{run['id']}")
