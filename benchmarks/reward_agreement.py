"""How well a reward block trains: the reward model's rank agreement with the gold reward on what PPO will show it.

    .venv/bin/python benchmarks/reward_agreement.py HOME                       # the shipped block, trainer seeds 2 5
    .venv/bin/python benchmarks/reward_agreement.py HOME --set stages.reward.batch_size=8 --seeds 0 1 2

HOME holds a finished `rlhf run smol-sentiment`: its reward stage's pairs and its PPO policy. Two responses to
every training prompt are sampled from the start policy and two from the PPO policy (once, cached in HOME), and
scored by the gold reward. For each trainer seed the reward stage's own trainer trains on the same pairs with the
block given (pipelines.yaml with `--set`), and the figures are Spearman's rho between the reward model's scores
and gold's (per policy and over both), and the accuracy on same-prompt pairs whose gold differs by 0.3 or more.
The stage's held-out pair accuracy covers 64 pairs of the start policy's samples alone; this also asks the reward
model to rank what a policy that has moved writes, on about 4 times as many samples.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from transformers.integrations import MLflowCallback

from rlhf import generation, gold, models, precision, training
from rlhf.config import load_pipeline
from rlhf.data.formats import text_of
from rlhf.data.prepare import load_splits
from rlhf.seeding import seed_everything
from rlhf.stages.reward.recipe import make_trainer

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "smol-sentiment"
CPU = torch.device("cpu")
MIN_GAP = 0.3


def only(pattern: str, home: Path) -> Path:
    found = sorted((home / "runs" / PIPELINE).glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"{home}: expected one {pattern}, found {len(found)}: run `rlhf run {PIPELINE}` there once")
    return found[0]


def start_model(home: Path) -> Path:
    """SmolLM2 as the pipeline converted it from GGUF: the start policy and the reward model's base."""
    return next(p for p in (home / "models").glob("gguf-*") if p.is_dir())


def samples(home: Path, block, scorer, chosen: str) -> list[dict]:
    """Two responses per training prompt from the start and from the PPO policy, with their gold scores."""
    cache = home / "reward_agreement_samples.json"
    if cache.exists():
        return json.loads(cache.read_text())
    start = start_model(home)
    prompts = list(load_splits(only("data/*/outputs/prompts", home))["train"]["prompt"])
    tokenizer = models.load_tokenizer(start)
    rows = []
    for name, directory in (("start", start), ("ppo", only("ppo/*/outputs/model", home))):
        policy = precision.frozen(models.load_causal_lm, directory, chosen, CPU)
        responses, _ = generation.sample(policy, tokenizer, prompts, block.max_new_tokens, block.temperature, 123, 64,
                                         phase=name, repeats=2)
        rows += [{"policy": name, "prompt": p, "response": r, "gold": scorer(text_of(p), r)}
                 for p, r in zip([p for p in prompts for _ in range(2)], responses)]
    cache.write_text(json.dumps(rows))
    return rows


def agreement(rows: list[dict], scores: list[float]) -> dict[str, float]:
    out = {}
    for part in ("start", "ppo", "all"):
        sub = [(r, s) for r, s in zip(rows, scores) if part in ("all", r["policy"])]
        ranks = pd.DataFrame({"model": [s for _, s in sub], "gold": [r["gold"] for r, _ in sub]}).rank()
        out[f"rho_{part}"] = round(float(ranks["model"].corr(ranks["gold"])), 3)  # Spearman's: Pearson's of ranks
        pairs = [(a, b) for a, b in zip(sub[::2], sub[1::2]) if abs(a[0]["gold"] - b[0]["gold"]) >= MIN_GAP]
        out[f"accuracy_{part}"] = round(sum((a[1] > b[1]) == (a[0]["gold"] > b[0]["gold"]) for a, b in pairs) / len(pairs), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("home", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 5])
    args = parser.parse_args()
    _, pipeline = load_pipeline(ROOT / "pipelines.yaml", PIPELINE, args.overrides)
    config = pipeline.stages.block("reward")
    chosen = precision.choose(config.precision, CPU)
    rows = samples(args.home, pipeline.stages.block("ppo"), gold.named(pipeline.stages.block("data").gold_reward), chosen)
    pair_dir = only("reward/*/outputs/pairs", args.home)
    base = start_model(args.home)
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as work:
            began = time.perf_counter()
            seed_everything(seed)
            trainer, tokenizer = make_trainer(config.model_dump(mode="json"), seed, base, pair_dir, 1, Path(work))
            trainer.remove_callback(MLflowCallback)  # nothing to track: the figures are printed
            trainer.train()
            training.save_policy(trainer, tokenizer, Path(work))
            seconds = time.perf_counter() - began
            model = precision.frozen(models.load_reward_model, Path(work) / "model", chosen, CPU)
            scores = generation.score(model, tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows], None)
        print(json.dumps({"seed": seed, "train_s": round(seconds, 1), **agreement(rows, scores), "set": args.overrides}),
              flush=True)


if __name__ == "__main__":
    main()
