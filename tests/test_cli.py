"""The `rlhf` console script as installed: usage errors, help, completion, Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RLHF = str(Path(sys.executable).parent / "rlhf")


def rlhf(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, "--home", str(project / "home"), *args], cwd=project, capture_output=True, text=True,
                          timeout=120, env={"PATH": str(Path(sys.executable).parent), "HF_HUB_OFFLINE": "1", **env})


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--bogus"], "error: No such option: --bogus (see `rlhf run --help`)"),
        (["nosuchcmd"], "error: No such command 'nosuchcmd'. (see `rlhf --help`)"),
        (["run", "--set"], "error: Option '--set' requires an argument."),
        (["run", "tiny-rlhf", "--from", "nosuch"], "error: --from nosuch: no such stage in this pipeline; stages: data, sft, reward"),
        (["run", "tiny-rlhf", "--only", "ppo"], "error: --only ppo: no such stage in this pipeline; stages: data, sft, reward"),
    ],
)
def test_a_usage_error_is_one_line_on_stderr_and_exit_2(project, args, message):
    done = rlhf(project, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [message] and done.stdout == ""


def test_help_shows_the_defaults(project):
    top, run = rlhf(project, "--help"), rlhf(project, "run", "--help")
    assert top.returncode == run.returncode == 0
    assert "[default: (./.rlhf)]" in top.stdout
    assert "./pipelines.yaml" in run.stdout and "default:" in run.stdout


@pytest.mark.parametrize(
    "words, expected",
    [("rlhf ru", ["run"]), ("rlhf run tiny-", ["tiny-rlhf", "tiny-ppo", "tiny-grpo", "tiny-dpo"]),
     ("rlhf run --from re", ["reward", "reinforce"])],
)
def test_shell_completion_offers_commands_pipelines_and_stages(project, words, expected):
    done = rlhf(project, _RLHF_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(len(words.split()) - 1))
    assert done.returncode == 0, done.stderr
    assert set(expected) <= set(done.stdout.split()), done.stdout


def test_ctrl_c_exits_130_saying_how_to_resume(project):
    log = project / "run.log"
    with log.open("w") as out:
        # SFT long enough that the interrupt lands while it trains, not as Prefect opens the task run
        # as from a terminal: a test run in the background of a shell inherits SIGINT ignored, and so would the CLI
        process = subprocess.Popen([RLHF, "--home", str(project / "home"), "run", "tiny-rlhf", "--set", "stages.sft.max_steps=600"],
                                   cwd=project, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while "stage sft: running" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.5)
    time.sleep(3)
    assert process.poll() is None, log.read_text()
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=120)
    tail = log.read_text().strip().splitlines()[-5:]  # servers the CLI started may still be saying goodbye
    assert code == 130, tail
    assert any(line.startswith("interrupted: run the same command again to resume") for line in tail), tail
    runs = project / "home" / "runs" / "tiny-rlhf"
    assert list(runs.glob("data/*/manifest.json")) and not list(runs.glob("sft/*/manifest.json"))
