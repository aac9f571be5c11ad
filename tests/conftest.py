import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf-test-1000.jsonl"

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
    (tmp_path / "pipelines.yaml").write_text(TINY_PIPELINES)
    write_jsonl(tmp_path / "prefs.jsonl", preference_rows())
    return tmp_path


class Cli:
    """Runs `rlhf` as a user would: a separate process, in the project directory."""

    def __init__(self, cwd: Path, home: Path):
        self.cwd, self.home = cwd, home

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "rlhf", "--home", str(self.home), *args]

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), cwd=self.cwd, capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*args), cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )


@pytest.fixture
def cli(project: Path) -> Cli:
    return Cli(project, project / "home")


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the CLI and everything it started (its Prefect server), like a crash."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
