"""Check the dependency floors of `pyproject.toml`: install every dependency at its floor, run a pipeline.

Builds a venv (`--venv`, default /tmp/rlhf-floors) with each library whose API
the code calls pinned to its floor (`name>=X` -> `name==X`), installs this
project into it without dependencies (not editable, as a user installs it),
and runs a tiny pipeline through every stage (data, SFT, reward, PPO on Ray,
evaluation and the registered policy) with the real CLI. The small utility
libraries keep their ranges: their floors are set by what the pinned ones
need, which pip settles. torch keeps its range too: it is the project's
given one, and the older torch builds on PyPI are CUDA builds of several GB.

    .venv/bin/python benchmarks/floor_versions.py [--venv DIR]

Prints the pins, the pipeline's summary and `floors: ok` or where it failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PINNED = {"transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "prefect", "ray", "mlflow", "typer", "pydantic"}
PIPELINE = """
default: floors
pipelines:
  floors:
    tracking: {experiment: floors}
    seed: 0
    ray: {num_workers: 1, cpus_per_worker: 2}
    stages:
      data:
        instructions: {source: synthetic_reviews, examples: 600}
        eval_fraction: 0.2
      sft:
        model: {init: scratch, vocab_size: 400, hidden_size: 32, layers: 2, heads: 2, intermediate_size: 64}
        learning_rate: 0.003
        batch_size: 16
        max_steps: 30
        eval_steps: 10
        save_steps: 10
        logging_steps: 5
      reward:
        pairs: {source: policy, count: 64, eval_count: 24, min_gold_gap: 0.25, max_new_tokens: 24}
        learning_rate: 0.005
        batch_size: 8
        max_steps: 16
        eval_steps: 8
        save_steps: 8
        logging_steps: 4
      ppo:
        iterations: 4
        batch_size: 8
        max_new_tokens: 12
        checkpoint_every: 2
      evaluate:
        prompts: 16
        max_new_tokens: 12
        registry: {min_win_rate: 0.0, max_kl: 1000}
"""


def floor_pins() -> list[str]:
    """`name[extras]==X` for the pinned libraries, the declared range for the others."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = []
    for text in project["dependencies"]:
        requirement = Requirement(text)
        floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        if requirement.name not in PINNED or not floors:
            pins.append(text)
        else:
            pins.append(f"{requirement.name}{extras}=={floors[0]}")
    return pins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "rlhf-floors")
    args = parser.parse_args()
    python = args.venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(args.venv)], check=True)
    pins = floor_pins()
    print("pins:", " ".join(pins), flush=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *pins], check=True)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True)  # not editable: as a user installs it

    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "pipelines.yaml").write_text(PIPELINE)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "RAY_ADDRESS"))}
        run = subprocess.run([str(args.venv / "bin" / "rlhf"), "--home", f"{work}/home", "run"], cwd=work,
                             env=env | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=1800)
        lost = subprocess.run([str(args.venv / "bin" / "rlhf"), "list"], cwd=f"{work}/home", capture_output=True, text=True)
    print(run.stdout[-4000:])
    if run.returncode != 0:
        print(run.stderr[-6000:])
        sys.exit(f"floors: the pipeline failed with exit {run.returncode}")
    print(f"with no pipelines.yaml around: exit {lost.returncode}, {lost.stderr.strip()}")
    print("floors: ok")


if __name__ == "__main__":
    main()
