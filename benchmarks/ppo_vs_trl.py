"""PPO seconds per iteration, ours against TRL 1.12's PPOTrainer on identical work, by phase.

The work is the one TRL's last PPO trainer was measured on: 32 prompts of 16
tokens per iteration, 40 new tokens at temperature 0.7, 4 epochs x 2
minibatches, LoRA r16 on all linear layers, a fully trained value model,
random-weight Llama models (speed does not depend on what weights learnt),
12 iterations, median of iterations 3-12. Both sides load the same saved
models and prompts. TRL runs in its own venv, built here on first use
(`--trl-venv`; TRL 1.13 removed PPOTrainer). Ours runs as 1 worker x 2 CPUs
(in this process, as a pipeline with that `ray` block does) and as 2 workers
x 1 CPU (on Ray Train); the runs alternate, TRL first, `--runs` times, and
each of ours is divided by the TRL run just before it. What comes before the
first iteration (Ray's start-up, loading models) is left out of the
per-iteration figures and reported on its own. A benchmark, not a test:

    .venv/bin/python benchmarks/ppo_vs_trl.py [--sizes tiny small] [--runs 2] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlflow  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402

from rlhf import models  # noqa: E402
from rlhf.blocks import Lora
from rlhf.cluster import RayConfig
from rlhf.stages.rl.config import PpoStage  # noqa: E402
from rlhf.generation import render  # noqa: E402
from rlhf.ppo import driver  # noqa: E402
from rlhf.synthetic_reviews import generate_examples  # noqa: E402

TRL_PINS = ["torch==2.13.0", "trl==1.12.0", "peft==0.21.2", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0"]
SIZES = {  # hidden, layers, heads, FFN, tied embeddings: TRL's measured "tiny" and "small"
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, tie_word_embeddings=True),
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1024, tie_word_embeddings=False),
}
WORK = dict(batch=32, max_new_tokens=40, temperature=0.7, epochs=4, minibatches=2, lora_r=16, learning_rate=1e-4, iterations=12, threads=2)
LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1)}  # workers x CPUs each: both use the same 2 cores
PHASES = ("generate", "score", "train", "other")
PROMPT_TOKENS = 16


def trl_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        print(f"building TRL 1.12's venv in {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *TRL_PINS], check=True)
        (venv / ".complete").touch()
    return python


def prepare(size: str, root: Path) -> tuple[Path, list]:
    """Save the models, tokenizer and equal-length prompts both sides load; returns the dir and our prompts."""
    examples = generate_examples(2000, 0.25, seed=0)
    tokenizer = models.train_tokenizer((e["prompt"] + " " + e["completion"] for e in examples), 1024)
    chats = [[{"role": "user", "content": e["prompt"] + " Be honest."}] for e in examples]
    ids = [tokenizer(render(tokenizer, c), add_special_tokens=False)["input_ids"] for c in chats]
    chosen = [i for i, x in enumerate(ids) if len(x) == PROMPT_TOKENS][:256]  # one length: no padding on either side
    config = LlamaConfig(
        vocab_size=len(tokenizer), num_key_value_heads=SIZES[size]["num_attention_heads"], max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, num_labels=1, **SIZES[size],
    )
    work_dir = root / size
    torch.manual_seed(0)
    for directory, model in (("policy", LlamaForCausalLM(config)), ("reward", LlamaForSequenceClassification(config))):
        model.save_pretrained(work_dir / directory)
        tokenizer.save_pretrained(work_dir / directory)
    (work_dir / "prompts.json").write_text(json.dumps([ids[i] for i in chosen]))
    (work_dir / "work.json").write_text(json.dumps(WORK))
    print(f"{size}: {LlamaForCausalLM(config).num_parameters() / 1e6:.2f}M parameters, {len(chosen)} prompts of {PROMPT_TOKENS} tokens", flush=True)
    return work_dir, [chats[i] for i in chosen]


def run_trl(python: Path, work_dir: Path) -> list[dict]:
    out = work_dir / "trl.json"
    env = os.environ | {"TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([str(python), str(Path(__file__).with_name("trl_ppo_reference.py")), str(work_dir), str(out)],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return [{"seconds": it["seconds"], **{p: it.get(p, 0.0) for p in PHASES[:3]}} for it in json.loads(out.read_text())]


def run_ours(work_dir: Path, prompts: list, workers: int, cpus: int, precision: str) -> tuple[list[dict], dict[str, float]]:
    """Per-iteration timings, and the seconds before the first iteration: ours (models, normalisation) and Ray's."""
    ppo = PpoStage(
        iterations=WORK["iterations"], batch_size=WORK["batch"], max_new_tokens=WORK["max_new_tokens"], temperature=WORK["temperature"],
        epochs=WORK["epochs"], minibatches=WORK["minibatches"], learning_rate=WORK["learning_rate"],
        critic_learning_rate=WORK["learning_rate"], lora=Lora(r=WORK["lora_r"], alpha=2 * WORK["lora_r"]), critic_lora=None,
        normalisation_samples=WORK["batch"], precision=precision, checkpoint_every=WORK["iterations"],
        samples_every=WORK["iterations"],
    )
    run = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("Default").experiment_id)
    start = time.monotonic()
    final = driver.run(
        "ppo", ppo, RayConfig(num_workers=workers, cpus_per_worker=cpus), name=f"{work_dir.name}-{workers}x{cpus}-{run.info.run_id}",
        storage=work_dir / "ray", seed=0, policy_model=work_dir / "policy", reward_model=work_dir / "reward", critic_lora=None,
        prompts=prompts, gold=None, mlflow_uri=mlflow.get_tracking_uri(), mlflow_run_id=run.info.run_id,
    )
    wall = time.monotonic() - start
    history = json.loads((final / "history.json").read_text())
    iterations = [{"seconds": h["seconds_iteration"], "sync": h["seconds_sync"], **{p: h[f"seconds_{p}"] for p in PHASES[:3]}} for h in history]
    setup = history[0]["seconds_setup"]
    return iterations, {"setup": setup, "ray": wall - setup - sum(it["seconds"] for it in iterations)}


def steady(iterations: list[dict]) -> dict[str, float]:
    """Medians over iterations 3-12, with `other` the iteration's time outside generate, score and train."""
    rows = iterations[2:]
    medians = {p: statistics.median(r[p] for r in rows) for p in (*PHASES[:3], "sync") if p in rows[0]}
    return {"seconds": statistics.median(r["seconds"] for r in rows), **medians,
            "other": statistics.median(r["seconds"] - r["generate"] - r["score"] - r["train"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--runs", type=int, default=2, help="alternating runs of each side (at least 2 for a comparison)")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS), help="ours: workers x CPUs each")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="ours only: TRL's PPOTrainer does not autocast")
    parser.add_argument("--trl-venv", type=Path, default=Path.home() / ".cache" / "rlhf-pipeline" / "trl-1.12-venv")
    args = parser.parse_args()
    python = trl_python(args.trl_venv)
    results: dict[tuple[str, str], list[dict]] = {}
    startups: dict[str, list[dict[str, float]]] = {}  # by layout
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        prepared = {size: prepare(size, root) for size in args.sizes}
        for repeat in range(args.runs):
            for size, (work_dir, prompts) in prepared.items():
                trl = steady(run_trl(python, work_dir))
                results.setdefault((size, "TRL 1.12"), []).append(trl | {"ratio": 1.0})
                print(f"run {repeat + 1} {size:5} TRL 1.12        {trl['seconds']:.3f} s/iteration", flush=True)
                for workers, cpus in (LAYOUTS[layout] for layout in args.layouts):
                    iterations, startup = run_ours(work_dir, prompts, workers, cpus, args.precision)
                    ours = steady(iterations)
                    ours["ratio"] = ours["seconds"] / trl["seconds"]
                    ours["ratios"] = {p: ours[p] / trl[p] if trl[p] else float("nan") for p in PHASES}
                    results.setdefault((size, f"ours {workers} x {cpus}"), []).append(ours)
                    startups.setdefault(f"{workers} x {cpus}", []).append(startup)
                    print(f"run {repeat + 1} {size:5} ours {workers} x {cpus} {args.precision} {ours['seconds']:.3f} s/iteration "
                          f"({ours['ratio']:.2f} x TRL), gradient sync {ours['sync']:.3f} s; before the first iteration: Ray {startup['ray']:.1f} s, "
                          f"models and normalisation {startup['setup']:.1f} s", flush=True)

    header = f"{'size':6} {'engine':14} {'s/iteration':>15} {'x TRL':>11} " + " ".join(f"{p + ' s (x TRL)':>21}" for p in PHASES)
    print("\n" + header + "\n" + "-" * len(header))
    for (size, engine), runs in results.items():
        seconds = " / ".join(f"{r['seconds']:.2f}" for r in runs)
        ratios = " / ".join(f"{r['ratio']:.2f}" for r in runs)
        cells = []
        for p in PHASES:
            value = statistics.fmean(r[p] for r in runs)
            ratio = f" ({statistics.fmean(r['ratios'][p] for r in runs):.2f})" if "ratios" in runs[0] else ""
            cells.append(f"{value:>13.3f}{ratio:>8}")
        print(f"{size:6} {engine:14} {seconds:>15} {ratios:>11} " + " ".join(cells))
    for layout, runs in startups.items():
        print(f"ours {layout} {args.precision}, before the first iteration (median of runs): Ray start-up and teardown "
              f"{statistics.median(s['ray'] for s in runs):.1f} s, models and normalisation samples "
              f"{statistics.median(s['setup'] for s in runs):.1f} s")


if __name__ == "__main__":
    main()
