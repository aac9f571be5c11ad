"""PPO against GRPO, Dr. GRPO, RLOO, REINFORCE++ and DPO on the demo, over seeds: one table.

For each seed, `rlhf run demo --set seed=S` makes the data, SFT and reward
stages, then `demo-grpo`, `demo-drgrpo`, `demo-rloo`, `demo-reinforce` and `demo-dpo` reuse
them (same fingerprints) and train only their own stage and its evaluation.
The table has, per method, the evaluation's gold gain, KL to the SFT policy
and reward-model win rate over SFT, and the wall time of the method's stage,
for each seed and their mean. Every run shares one home (`--home`, else under `--work`).

    .venv/bin/python benchmarks/methods.py --seeds 0 1 2 --work /tmp/rlhf-methods
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RLHF = str(Path(sys.executable).parent / "rlhf")
METHODS = {"ppo": "demo", "grpo": "demo-grpo", "drgrpo": "demo-drgrpo", "rloo": "demo-rloo", "reinforce": "demo-reinforce",
           "dpo": "demo-dpo"}


def run(home: Path, pipeline: str, seed: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([RLHF, "--home", str(home), "run", pipeline, "--set", f"seed={seed}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{pipeline} seed {seed} failed:\n{done.stderr[-3000:]}")


def manifest(home: Path, pipeline: str, stage: str, seed: int) -> dict:
    """The stage's newest result for this seed (a rerun, `--from`, makes another)."""
    found = [json.loads(p.read_text()) for p in (home / "runs" / pipeline / stage).glob("*/manifest.json")]
    return max((m for m in found if m["seed"] == seed), key=lambda m: m["finished_at"])


def row(home: Path, method: str, seed: int) -> dict:
    pipeline = METHODS[method]
    evaluation = manifest(home, pipeline, "evaluate", seed)["metrics"]
    return {
        "method": method, "seed": seed, "gold_gain": evaluation["gold_gain"], "kl": evaluation["kl_to_baseline"],
        "win_rate_score": evaluation["win_rate_score"], "seconds": manifest(home, pipeline, method, seed)["seconds"],
    }


def table(rows: list[dict], seeds: list[int]) -> str:
    lines = ["| method | gold gain (" + " / ".join(f"seed {s}" for s in seeds) + ") | mean gold gain | mean KL to SFT "
             "| mean RM win rate | mean stage seconds |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        mean = {key: statistics.fmean(r[key] for r in mine) for key in ("gold_gain", "kl", "win_rate_score", "seconds")}
        gains = " / ".join(f"{r['gold_gain']:+.3f}" for r in mine)
        lines.append(f"| {method} | {gains} | {mean['gold_gain']:+.3f} "
                     f"| {mean['kl']:.2f} | {mean['win_rate_score']:.0%} | {mean['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/rlhf-methods"))
    parser.add_argument("--home", type=Path, help="the rlhf home (default: WORK/home); one with demo runs saves their time")
    parser.add_argument("--report", action="store_true", help="run nothing: the table of what the home holds")
    args = parser.parse_args()
    home = args.home or args.work / "home"
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for method in ["ppo"] + [m for m in args.methods if m != "ppo"]:  # demo first: it makes the shared stages
            if not args.report:
                run(home, METHODS[method], seed)
            if method in args.methods:
                rows.append(row(home, method, seed))
                print(json.dumps(rows[-1]), flush=True)
    (args.work / "methods.json").write_text(json.dumps(rows, indent=2))
    print(table(rows, args.seeds))


if __name__ == "__main__":
    main()
