"""Fault injection on a small pipeline through the real CLI; prints a table of what happened.

Cases, each on its own home under `--work` (default /tmp/rlhf-faults):
- kill: SIGKILL `rlhf run` (and everything it started) at `--kills` seeded random
  moments, spread over the five stages: the stages before the target are
  copied from an uninterrupted reference run, and the kill comes a random
  fraction of the target stage's reference duration after it starts. Then
  `rlhf run` again to completion, and every stage's output digest and metrics
  are compared with the reference's.
- concurrent: two `rlhf run` on one fresh home at once.
- disk full: the reward stage's directory on a 64 KB tmpfs (needs root), then
  room again (remount), then a rerun.
- damaged manifest: the SFT manifest cut in half, then a rerun.
- damaged checkpoint: SFT killed after its second checkpoint, the newest
  checkpoint's weights cut in half, then a rerun.
- server loss: an MLflow (or Prefect) server the run uses is killed while
  SFT trains; what the run does, what survives, and a rerun once it is back.

    .venv/bin/python benchmarks/faults.py [--kills 20] [--seed 0] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil

RLHF = str(Path(sys.executable).parent / "rlhf")
NAME = "faults"
STAGES = ["data", "sft", "reward", "ppo", "evaluate"]
PIPELINE = f"""
default: {NAME}
pipelines:
  {NAME}:
    tracking: {{experiment: {NAME}}}
    seed: 0
    ray: {{num_workers: 1, cpus_per_worker: 2}}
    stages:
      data:
        instructions: {{source: synthetic_reviews, examples: 2000}}
        eval_fraction: 0.1
      sft:
        model: {{init: scratch, vocab_size: 400, hidden_size: 64, layers: 2, heads: 2, intermediate_size: 128}}
        learning_rate: 0.003
        batch_size: 16
        max_steps: 120
        eval_steps: 40
        save_steps: 20
        logging_steps: 10
      reward:
        pairs: {{source: policy, count: 256, eval_count: 48, min_gold_gap: 0.25, max_new_tokens: 24}}
        learning_rate: 0.005
        batch_size: 16
        epochs: 2
        eval_steps: 16
        save_steps: 8
        logging_steps: 8
      ppo:
        iterations: 12
        batch_size: 16
        max_new_tokens: 16
        learning_rate: 0.003
        checkpoint_every: 3
      evaluate:
        prompts: 32
        max_new_tokens: 16
        registry: {{min_win_rate: 0.0, max_kl: 1000}}
"""


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API", "RAY_ADDRESS"))} | {
        "HF_HUB_OFFLINE": "1"}


def run(project: Path, home: Path, *args: str, timeout: float = 1800, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, "--home", str(home), "run", *args], cwd=project, env=env() | extra,
                          capture_output=True, text=True, timeout=timeout)


def start(project: Path, home: Path, log: Path, **extra: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([RLHF, "--home", str(home), "run"], cwd=project, env=env() | extra, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the CLI and everything it started (Prefect's server, Ray's processes), like a crash."""
    try:
        descendants = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:  # Ray starts some processes in sessions of their own
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)


def manifests(home: Path) -> dict[str, dict]:
    found = {}
    for path in (home / "runs" / NAME).glob("*/*/manifest.json"):
        try:
            found[path.parts[-3]] = json.loads(path.read_text())
        except ValueError:
            pass
    return found


def actions(stdout: str) -> dict[str, str]:
    found = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 3 and cells[1] in STAGES:
            found[cells[1]] = cells[2]
    return found


# metrics of the machine or of the attempt, not of the result (train_loss: the mean over this attempt's steps),
# and the path of an adapter's base model, which names the home
BOOKKEEPING = ("seconds", "rss", "per_second", "registered", "resumed_from", "restored_from", "train_loss", "base_model")


def result_digest(outputs: Path) -> str:
    """The outputs' digest without what differs on every run or home: the logged model's id, peft's adapter
    README (it names the base model's path), and in JSON files the bookkeeping keys (the PPO history's
    per-iteration seconds, the evaluation's registered version, the adapter's base path)."""
    hasher = hashlib.sha256()
    for path in sorted(p for p in outputs.rglob("*") if p.is_file() and p.name not in ("mlflow_model.json", "README.md")):
        data = path.read_bytes()
        if path.suffix == ".json":
            data = json.dumps(_without_bookkeeping(json.loads(data)), sort_keys=True).encode()
        hasher.update(str(path.relative_to(outputs)).encode() + b"\0" + data + b"\0")
    return hasher.hexdigest()


def _without_bookkeeping(value):
    if isinstance(value, dict):
        return {k: _without_bookkeeping(v) for k, v in value.items() if not any(t in k for t in BOOKKEEPING)}
    if isinstance(value, list):
        return [_without_bookkeeping(v) for v in value]
    return value


def compare(home: Path, reference: dict[str, dict]) -> list[str]:
    """Stages whose results (outputs without bookkeeping, metrics) differ from the reference's."""
    got = manifests(home)
    differing = []
    for stage in STAGES:
        mine, theirs = got.get(stage), reference[stage]
        if mine is None:
            differing.append(f"{stage} (missing)")
            continue
        same_metrics = all(abs(mine["metrics"].get(k, float("nan")) - v) <= 1e-6 * max(1, abs(v))
                           for k, v in theirs["metrics"].items() if not any(t in k for t in BOOKKEEPING))
        same_outputs = result_digest(Path(mine["outputs"]["path"])) == result_digest(Path(theirs["outputs"]["path"]))
        if not same_outputs or not same_metrics:
            differing.append(stage if same_metrics else f"{stage} (metrics)")
    return differing


def seconds(manifest: dict) -> tuple[float, float]:
    started = datetime.fromisoformat(manifest["started_at"]).timestamp()
    return started, datetime.fromisoformat(manifest["finished_at"]).timestamp() - started


def upstream_of(reference_home: Path, stage: str, home: Path) -> None:
    """A copy of the reference home in which the stages from `stage` on have not run."""
    shutil.copytree(reference_home, home)
    for later in STAGES[STAGES.index(stage):]:
        shutil.rmtree(home / "runs" / NAME / later, ignore_errors=True)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def kills(project: Path, work: Path, reference_home: Path, reference: dict, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        stage = STAGES[index % len(STAGES)]
        _, duration = seconds(reference[stage])
        delay = rng.random() * duration
        home = work / f"kill-{index:02d}"
        upstream_of(reference_home, stage, home)
        process = start(project, home, work / f"kill-{index:02d}.log")
        stage_root = home / "runs" / NAME / stage
        begun = wait_for(lambda: any(stage_root.glob("*/work")) or process.poll() is not None, 600)
        time.sleep(delay)
        finished_first = process.poll() is not None
        kill(process)
        rerun = run(project, home)
        acted = actions(rerun.stdout)
        rows.append({
            "kill": index + 1, "stage": stage, "after_s": round(delay, 1), "began": begun, "finished_first": finished_first,
            "rerun_exit": rerun.returncode, "actions": acted,
            "differing": compare(home, reference) if rerun.returncode == 0 else ["rerun failed"],
        })
        print(json.dumps(rows[-1]), flush=True)
        if rerun.returncode != 0:
            print(rerun.stderr[-3000:], flush=True)
    return rows


def concurrent(project: Path, work: Path, reference: dict) -> dict:
    home = work / "concurrent"
    first, second = (start(project, home, work / f"concurrent-{n}.log") for n in (1, 2))
    codes = [first.wait(timeout=1800), second.wait(timeout=1800)]
    summaries = [actions((work / f"concurrent-{n}.log").read_text()) for n in (1, 2)]
    trained = {stage: sum(s.get(stage) in ("ran", "resumed") for s in summaries) for stage in STAGES}
    return {"exits": codes, "trained per stage": trained, "differing": compare(home, reference)}


def disk_full(project: Path, work: Path, reference_home: Path, reference: dict) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root for a tmpfs"}
    home = work / "disk-full"
    upstream_of(reference_home, "reward", home)
    mount = home / "runs" / NAME / "reward"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        full = run(project, home)
        error = full.stderr.strip().splitlines()[-1] if full.stderr.strip() else ""
        no_manifest = not list(mount.glob("*/manifest.json"))
        subprocess.run(["mount", "-o", "remount,size=512m", str(mount)], check=True)
        again = run(project, home)
        result = {"exit when full": full.returncode, "message": error[:300], "no manifest": no_manifest,
                  "rerun exit": again.returncode, "rerun actions": actions(again.stdout),
                  "differing": compare(home, reference) if again.returncode == 0 else ["rerun failed"]}
    finally:
        subprocess.run(["umount", "-l", str(mount)])
    return result


def damaged_manifest(project: Path, work: Path, reference_home: Path, reference: dict) -> dict:
    home = work / "damaged-manifest"
    shutil.copytree(reference_home, home)
    [path] = (home / "runs" / NAME / "sft").glob("*/manifest.json")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    again = run(project, home)
    return {"exit": again.returncode, "warned": "is damaged" in again.stderr + again.stdout,
            "actions": actions(again.stdout), "differing": compare(home, reference)}


def damaged_checkpoint(project: Path, work: Path, reference_home: Path, reference: dict) -> dict:
    home = work / "damaged-checkpoint"
    upstream_of(reference_home, "sft", home)
    process = start(project, home, work / "damaged-checkpoint.log")
    seals = lambda: sorted((home / "runs" / NAME / "sft").glob("*/work/trainer/rank-0/checkpoint-*.sha256"))  # noqa: E731
    wait_for(lambda: len(seals()) >= 2 or process.poll() is not None, 900)
    kill(process)
    newest = max((Path(str(s).removesuffix(".sha256")) for s in seals()), key=lambda p: int(p.name.split("-")[1]))
    weights = next(newest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    again = run(project, home)
    log = next((home / "runs" / NAME / "sft").glob("*/stage.log")).read_text() + again.stderr
    resumed_from = [line for line in log.splitlines() if "resuming from" in line]
    return {"damaged": newest.name, "exit": again.returncode, "warned": f"{newest.name} is damaged" in log,
            "resumed from": resumed_from[-1].split("resuming from")[-1].strip()[-40:] if resumed_from else None,
            "actions": actions(again.stdout), "differing": compare(home, reference)}


def server_loss(project: Path, work: Path, reference_home: Path, reference: dict, which: str) -> dict:
    """The tracking (MLflow) or orchestration (Prefect) server stops while SFT trains, then comes back."""
    import socket

    home = work / f"{which}-loss"
    upstream_of(reference_home, "sft", home)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    if which == "mlflow":
        command = [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{home}/server.db",
                   "--default-artifact-root", str(home / "server-artifacts"), "--host", "127.0.0.1", "--port", port,
                   "--workers", "1"]
        # MLflow's client retries each call for minutes by default; two retries show the end sooner
        server_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        client = {"MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    else:
        command = [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port]
        server_env, client = {"PREFECT_HOME": str(home / "prefect-server")}, {"PREFECT_API_URL": f"{url}/api"}

    def serve() -> subprocess.Popen:
        server = subprocess.Popen(command, env=env() | server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        import urllib.request

        def up() -> bool:
            try:
                return urllib.request.urlopen(f"{url}/{'health' if which == 'mlflow' else 'api/health'}", timeout=2).status == 200
            except OSError:
                return False

        assert wait_for(up, 180), f"{which} server did not start"
        return server

    server = serve()
    process = start(project, home, work / f"{which}-loss.log", **client)
    sft = home / "runs" / NAME / "sft"
    wait_for(lambda: any(sft.glob("*/work/trainer/rank-0/checkpoint-*.sha256")) or process.poll() is not None, 900)
    stopped = time.monotonic()
    kill(server)
    code = process.wait(timeout=1800)
    after = round(time.monotonic() - stopped)
    lines = (work / f"{which}-loss.log").read_text().strip().splitlines()
    kept = sorted(p.name for p in sft.glob("*/work/trainer/rank-0/checkpoint-*") if p.is_dir())
    server = serve()
    try:
        again = run(project, home, **client)
    finally:
        kill(server)
    return {"exit": code, "seconds after the stop": after, "last line": lines[-1][:300] if lines else "",
            "tracebacks": sum("Traceback" in line for line in lines), "checkpoints kept": kept,
            "rerun exit": again.returncode, "rerun actions": actions(again.stdout),
            "differing": compare(home, reference) if again.returncode == 0 else ["rerun failed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rlhf-faults"))
    parser.add_argument("--cases", nargs="+",
                        default=["kill", "concurrent", "disk-full", "manifest", "checkpoint", "mlflow", "prefect"])
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    project = args.work / "project"
    project.mkdir(parents=True)
    (project / "pipelines.yaml").write_text(PIPELINE)

    reference_home = args.work / "reference"
    done = run(project, reference_home)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = manifests(reference_home)
    print("reference:", {stage: round(seconds(m)[1], 1) for stage, m in reference.items()}, flush=True)
    results = {}
    if "kill" in args.cases:
        twin = run(project, args.work / "reference-2")
        print("a second uninterrupted run differs in:",
              compare(args.work / "reference-2", reference) if twin.returncode == 0 else "failed", flush=True)
        rows = kills(project, args.work, reference_home, reference, args.kills, args.seed)
        results["kill"] = {
            "kills": len(rows),
            "recovered": sum(r["rerun_exit"] == 0 for r in rows),
            "resumed a stage": sum("resumed" in r["actions"].values() for r in rows),
            "identical": sum(r["rerun_exit"] == 0 and not r["differing"] for r in rows),
            "differing": [(r["kill"], r["stage"], r["differing"]) for r in rows if r["differing"]],
            "lost": sum(r["rerun_exit"] != 0 for r in rows),
        }
    for case, function in (("concurrent", concurrent), ("disk-full", disk_full), ("manifest", damaged_manifest),
                           ("checkpoint", damaged_checkpoint)):
        if case in args.cases:
            arguments = (project, args.work, reference) if case == "concurrent" else (project, args.work, reference_home, reference)
            results[case] = function(*arguments)
            print(case, json.dumps(results[case]), flush=True)
    for which in ("mlflow", "prefect"):
        if which in args.cases:
            results[f"{which} server loss"] = server_loss(project, args.work, reference_home, reference, which)
            print(which, json.dumps(results[f"{which} server loss"]), flush=True)
    print(json.dumps(results, indent=2))
    (args.work / "faults.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
