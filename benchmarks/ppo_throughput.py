"""PPO throughput: seconds per iteration by phase, samples and tokens per second, peak memory.

Runs our PPO engine on Ray Train for the demo model (~1M parameters) and a
~12M-parameter model, as 1 worker x 2 CPUs and 2 workers x 1 CPU (the same
cores either way), on random-weight models (speed does not depend on what
the weights learnt). `sync` is the part of training spent in the gradient
all-reduce, waiting for the slower worker included. A benchmark, not a test:

    .venv/bin/python benchmarks/ppo_throughput.py [--iterations 8] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlflow  # noqa: E402

from rlhf import models  # noqa: E402
from rlhf.config import PpoStage, RayConfig, ScratchModel  # noqa: E402
from rlhf.ppo import driver  # noqa: E402
from rlhf.synthetic_reviews import generate_examples  # noqa: E402

SIZES = {
    "demo ~1M": ScratchModel(init="scratch"),
    "~12M": ScratchModel(init="scratch", hidden_size=384, layers=5, heads=6, intermediate_size=1536),
}


def make_models(size: ScratchModel, root: Path) -> tuple[Path, Path, list]:
    examples = generate_examples(2000, 0.25, seed=0)
    tokenizer = models.train_tokenizer((e["prompt"] + " " + e["completion"] for e in examples), size.vocab_size)
    policy = models.build_model(size, tokenizer, seed=0)
    sft = root / "sft"
    policy.save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    reward = root / "reward"
    for part in models.new_reward_model(sft):
        part.save_pretrained(reward)
    prompts = [[{"role": "user", "content": e["prompt"]}] for e in examples[:256]]
    return sft, reward, prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl")
    args = parser.parse_args()
    ppo = PpoStage(iterations=args.iterations, checkpoint_every=args.iterations, samples_every=args.iterations)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
        for label, size in SIZES.items():
            sft, reward, prompts = make_models(size, root / label.replace(" ", "_"))
            parameters = models.load_causal_lm(sft).num_parameters()
            for workers, cpus in ((1, 2), (2, 1)):
                run = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("Default").experiment_id)
                final = driver.run(
                    ppo, RayConfig(num_workers=workers, cpus_per_worker=cpus, use_gpu=args.gpu),
                    name=f"bench-{parameters}-{workers}", storage=root / "ray", seed=0, policy_model=sft,
                    reward_model=reward, critic_lora=None, prompts=prompts, gold="synthetic_reviews",
                    mlflow_uri=mlflow.get_tracking_uri(),
                    mlflow_run_id=run.info.run_id,
                )
                steps = json.loads((final / "history.json").read_text())[1:]  # the first iteration warms up
                phases = {p: statistics.fmean(s[f"seconds_{p}"] for s in steps) for p in ("generate", "score", "train", "sync")}
                total = phases["generate"] + phases["score"] + phases["train"]
                tokens = statistics.fmean(s["response_length"] for s in steps) * ppo.batch_size
                rows.append((label, f"{parameters / 1e6:.1f}M", f"{workers} x {cpus}", phases, total, ppo.batch_size / total,
                             tokens / total, max(s["peak_rss_mb"] for s in steps)))

    header = (f"{'model':10} {'params':>7} {'workers':>7} {'gen s':>7} {'score s':>7} {'train s':>7} {'sync s':>7} {'iter s':>7} "
              f"{'samples/s':>9} {'tokens/s':>9} {'peak RSS MB/worker':>19}")
    print(header)
    print("-" * len(header))
    for label, params, workers, phases, total, samples, tokens, rss in rows:
        print(f"{label:10} {params:>7} {workers:>7} {phases['generate']:>7.2f} {phases['score']:>7.2f} {phases['train']:>7.2f} {phases['sync']:>7.2f} "
              f"{total:>7.2f} {samples:>9.1f} {tokens:>9.0f} {rss:>19.0f}")


if __name__ == "__main__":
    main()
