"""GRPO seconds per iteration, ours against TRL 1.16's GRPOTrainer (no vLLM) on identical work, by phase.

The work of one iteration: 8 prompts of one token length (no padding on either side), 4 responses to each
(32 completions), up to 32 new tokens at temperature 1.0 (top-k and top-p off), then μ = 2 passes over the
batch in 2 minibatches (4 optimizer steps of 16 completions), LoRA r16 alpha 32 (dropout 0) on every linear
layer, the k3 KL to the reference in the loss with beta 0.04, the clipped surrogate (0.2), gradient norm
clipped at 1, AdamW with a linear decay from 1e-4. The policy is SmolLM2-135M-Instruct (`make smollm2`), or
random weights of its shape and tokenizer (`random-135m`), or a tiny random Llama (`tiny`, for a smoke test);
the reward model is a sequence classifier on the policy's weights (`models.new_reward_model`, random head:
speed does not depend on what it scores). Both are saved once under ~/.cache/rlhf-pipeline/grpo-vs-trl/
and both sides load them from there (the policy through `models.load_causal_lm` on both: TRL too gets its LM
head fed one block, without which a bf16 CPU spends about a second per generated token there), and both
score the decoded text with the project's scorer (`generation.score`, what `Roles.scores` calls): TRL
through a `reward_funcs` callable.

Each side runs in a fresh process of this file (`--side`) on 2 CPU threads: TRL's GRPOTrainer, and ours as
the `grpo` stage through `rlhf.ppo.driver.run` as 1 worker x 2 CPUs (in that process, as a pipeline with
that `ray` block does). Runs alternate, TRL first, `--runs` times per precision; each of ours is divided by
the TRL run just before it. Figures are medians over the steady iterations of 5 (`--iterations`; the
first two left out, one when there are fewer than four). What comes before the first iteration (imports,
loading, TRL's trainer, our normalisation samples) is reported on its own. A benchmark, not a test:

    .venv/bin/python benchmarks/grpo_vs_trl.py [--model smollm2|random-135m|tiny] [--runs 2] [--precision fp32 bf16] [--iterations N]

Phases. generate: tokenising the prompts, sampling, decoding (TRL: `_generate`). score: log-probs of the
policy and of the reference (adapter off), the reward model on the decoded text, advantages (TRL: the rest
of `_prepare_inputs`, its metrics bookkeeping included). train: forward, backward,
gradient clipping and optimizer steps (TRL: `training_step` less `_prepare_inputs`, `_clip_grad_norm`, and
the optimizer step between its callbacks). other: the rest of the iteration. Left out of every iteration on
both sides: logging (our MLflow metrics, TRL's log every iteration) and checkpoints.

What is not the same: TRL computes scoring log-probs in chunks of one minibatch, ours in one pass; ours runs each
prompt through the model once for its 4 responses, in sampling and in scoring (its keys and values copied to each),
TRL once per response. bf16:
ours holds the frozen weights in bf16, autocasts, and uses eager attention on a CPU; TRL's `bf16=True`
autocasts around fp32 weights in scoring and training only (peft's `generate` goes around the forward that
accelerate wraps, so TRL samples in fp32), and its reward callable is autocast here as accelerate wraps a
reward model TRL is given as a module. Our setup draws `normalisation_samples`, TRL has none. With real SmolLM2 weights responses end at
EOS at random, so the work per iteration is the same only on average: the table shows both sides' mean
response length. Not measured: vLLM, several workers, gradient checkpointing, a GPU.
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
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import psutil  # noqa: E402
import torch  # noqa: E402

from rlhf import generation, models  # noqa: E402
from rlhf.blocks import Lora  # noqa: E402
from rlhf.synthetic_reviews import generate_examples  # noqa: E402
from rlhf.training import peft_config  # noqa: E402

CACHE = Path.home() / ".cache" / "rlhf-pipeline" / "grpo-vs-trl"
MODELS = ("smollm2", "random-135m", "tiny")
WORK = dict(prompts=8, group=4, max_new_tokens=32, temperature=1.0, epochs=2, minibatches=2, lora_r=16, lora_alpha=32,
            learning_rate=1e-4, beta=0.04, clip=0.2, max_grad_norm=1.0, iterations=5, threads=2, normalisation_samples=8)
# our loss aggregation -> TRL's loss_type that reduces the same way when one optimizer step is one minibatch
# (gradient_accumulation_steps=1): bnpo is the masked mean over the step's tokens; dapo would divide by the
# generation batch's tokens over steps_per_generation instead, a different scale
LOSS_TYPES = {"token_mean": "bnpo", "seq_mean_token_mean": "grpo"}
PHASES = ("generate", "score", "train", "other")


# ---------------------------------------------------------------- the models and prompts both sides load


def prepare(kind: str) -> Path:
    """The policy and reward model of `kind`, saved once: `<dir>/policy`, `<dir>/reward`, each with its tokenizer."""
    directory = CACHE / kind
    if (directory / ".complete").exists():
        return directory
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if kind == "tiny":
        tokenizer = models.train_tokenizer((e["prompt"] + " " + e["completion"] for e in generate_examples(2000, 0.25, seed=0)), 1024)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_config(config)
    else:
        from rl_memory import SHAPES, SMOLLM2  # share its converted SmolLM2

        smollm2 = models.pretrained_dir(SMOLLM2, SHAPES, "SmolLM2 (make smollm2)")
        tokenizer = models.load_tokenizer(smollm2)
        if kind == "smollm2":
            policy = models.load_causal_lm(smollm2)
        else:
            torch.manual_seed(0)
            policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2))
    # TRL stops at every EOS id the generation config names, ours at the tokenizer's: make them one
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.save_pretrained(directory / "policy")
    tokenizer.save_pretrained(directory / "policy")
    reward, reward_tokenizer = models.new_reward_model(directory / "policy")
    reward.save_pretrained(directory / "reward")
    reward_tokenizer.save_pretrained(directory / "reward")
    (directory / ".complete").touch()
    return directory


def equal_length_prompts(policy_dir: Path) -> tuple[list, int]:
    """Chat prompts that all render to the commonest token length: no padding on either side."""
    tokenizer = models.load_tokenizer(policy_dir)
    chats = [[{"role": "user", "content": e["prompt"]}] for e in generate_examples(2000, 0.25, seed=0)]
    lengths = [len(tokenizer(generation.render(tokenizer, c), add_special_tokens=False)["input_ids"]) for c in chats]
    common = statistics.mode(lengths)
    return [c for c, n in zip(chats, lengths) if n == common][:256], common


# ---------------------------------------------------------------- the two sides, each in its own process


def since_start() -> float:
    """Seconds since this process started: a side's start-up counts its imports."""
    return time.time() - psutil.Process().create_time()


def trl_side(work: dict) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(work["threads"])
    bf16 = work["precision"] == "bf16"
    policy_dir, reward_dir = Path(work["policy"]), Path(work["reward"])
    reward = models.load_reward_model(reward_dir).eval().requires_grad_(False)
    models.disable_dropout(reward)
    reward_tokenizer = models.load_tokenizer(reward_dir, padding_side="left")

    def reward_model(prompts, completions, **_):
        # as `Roles.scores` does; autocast in bf16 as accelerate's `prepare_model` wraps a reward module TRL is given
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return generation.score(reward, reward_tokenizer, prompts, [c[0]["content"] for c in completions], max_length=None)

    steps = work["epochs"] * work["minibatches"]  # optimizer steps per generation round: one of our iterations
    config = GRPOConfig(
        output_dir=str(Path(work["out"]).with_suffix(".trl")), use_cpu=True, bf16=bf16, seed=0,
        num_generations=work["group"],
        # one generation round of prompts x group completions, split into `minibatches` optimizer steps, each
        # used `epochs` times (TRL's μ); no gradient accumulation, so one training_step is one optimizer step
        per_device_train_batch_size=work["prompts"] * work["group"] // work["minibatches"],
        steps_per_generation=work["minibatches"], gradient_accumulation_steps=1, num_iterations=work["epochs"],
        max_steps=work["iterations"] * steps,
        max_completion_length=work["max_new_tokens"], temperature=work["temperature"], top_k=0, top_p=1.0,
        beta=work["beta"], epsilon=work["clip"], loss_type=LOSS_TYPES[work["loss_aggregation"]], scale_rewards="group",
        learning_rate=work["learning_rate"], lr_scheduler_type="linear", weight_decay=0.0, optim="adamw_torch_fused",
        max_grad_norm=work["max_grad_norm"],
        gradient_checkpointing=False,  # TRL's default is on, ours off
        disable_dropout=True, logging_steps=steps, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    lora = Lora(r=work["lora_r"], alpha=work["lora_alpha"], dropout=0.0)
    trainer = GRPOTrainer(
        model=models.load_causal_lm(policy_dir), reward_funcs=reward_model, args=config,
        train_dataset=Dataset.from_dict({"prompt": work["chats"]}), peft_config=peft_config(lora, "CAUSAL_LM"),
        processing_class=models.load_tokenizer(policy_dir, padding_side="left"),
    )

    phases: dict[str, float] = defaultdict(float)
    seen = {"prompt_tokens": set(), "response_length": 0.0}

    def timed(function, phase):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[phase] += time.perf_counter() - start
        return wrapper

    def generate(prompts, _generate=trainer._generate):
        result = _generate(prompts)  # prompt ids, completion ids (through EOS), ...
        seen["prompt_tokens"].update(len(ids) for ids in result[0])
        seen["response_length"] = statistics.fmean(len(ids) for ids in result[1])
        return result

    # instance attributes: the Trainer calls each as self.<name>, and the nested ones (generate inside
    # _prepare_inputs inside training_step) are taken apart below
    trainer._generate = timed(generate, "generate")
    trainer._prepare_inputs = timed(trainer._prepare_inputs, "prepare_inputs")
    trainer.training_step = timed(trainer.training_step, "training_step")
    trainer._clip_grad_norm = timed(trainer._clip_grad_norm, "clip")
    iterations: list[dict] = []
    startup: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % steps == 0:
                if not startup:
                    startup.append(since_start())
                phases.clear()
                self.start = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            phases["optimizer"] += time.perf_counter() - self.optimizer

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % steps == 0:
                iterations.append({
                    "seconds": time.perf_counter() - self.start,
                    "generate": phases["generate"],
                    "score": phases["prepare_inputs"] - phases["generate"],
                    "train": phases["training_step"] - phases["prepare_inputs"] + phases["clip"] + phases["optimizer"],
                    "response_length": seen["response_length"],
                })

    trainer.add_callback(Clock())
    trainer.train()
    return {"iterations": iterations, "startup": startup[0], "prompt_tokens": sorted(seen["prompt_tokens"])}


def ours_side(work: dict) -> dict:
    import mlflow

    from rlhf.cluster import RayConfig
    from rlhf.ppo import driver
    from rlhf.stages.rl.config import GrpoStage, KLPenalty

    grpo = GrpoStage(
        iterations=work["iterations"], batch_size=work["prompts"], samples_per_prompt=work["group"],
        max_new_tokens=work["max_new_tokens"], temperature=work["temperature"], epochs=work["epochs"],
        minibatches=work["minibatches"], learning_rate=work["learning_rate"],
        lora=Lora(r=work["lora_r"], alpha=work["lora_alpha"], dropout=0.0), loss_aggregation=work["loss_aggregation"],
        kl=KLPenalty(beta=work["beta"], target=None, estimator="k3", in_loss=True), clip_ratio=work["clip"],
        max_grad_norm=work["max_grad_norm"], normalisation_samples=work["normalisation_samples"], precision=work["precision"],
        checkpoint_every=work["iterations"], samples_every=work["iterations"],
    )
    storage = Path(work["out"]).with_suffix(".ours")
    storage.mkdir()
    clock = time.monotonic()
    mlflow.set_tracking_uri(f"sqlite:///{storage}/mlflow.db")
    run = mlflow.MlflowClient().create_run("0")
    harness = time.monotonic() - clock  # the benchmark's MLflow store, not part of our start-up
    before = since_start() - harness
    final = driver.run(
        "grpo", grpo, RayConfig(num_workers=1, cpus_per_worker=work["threads"]), name="grpo", storage=storage, seed=0,
        policy_model=Path(work["policy"]), reward_model=Path(work["reward"]), critic_lora=None, prompts=work["chats"],
        gold=None, mlflow_uri=mlflow.get_tracking_uri(), mlflow_run_id=run.info.run_id,
    )
    history = json.loads((final / "history.json").read_text())
    iterations = [{"seconds": h["seconds_iteration"], "response_length": h["response_length"],
                   **{p: h[f"seconds_{p}"] for p in PHASES[:3]}} for h in history]
    return {"iterations": iterations, "startup": before + history[0]["seconds_setup"]}


def run_side(side: str, work: dict, tmp: Path) -> dict:
    work = work | {"out": str(tmp / f"{side}-{work['precision']}-{time.monotonic_ns()}")}
    path = Path(work["out"]).with_suffix(".json")
    path.write_text(json.dumps(work))
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, "--side", side, str(path)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the {side} side failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return json.loads(Path(work["out"]).with_suffix(".result").read_text())


# ---------------------------------------------------------------- figures


def steady(iterations: list[dict]) -> dict[str, float]:
    """Medians over the iterations after the first two (the first one, with fewer than four)."""
    rows = iterations[2 if len(iterations) > 3 else min(1, len(iterations) - 1):]
    medians = {key: statistics.median(r[key] for r in rows) for key in ("seconds", *PHASES[:3], "response_length")}
    return medians | {"other": statistics.median(r["seconds"] - r["generate"] - r["score"] - r["train"] for r in rows)}


def table(precision: str, trl: list[dict], ours: list[dict]) -> str:
    lines = [f"\n### {precision}\n",
             "| engine | s/iteration (each run) | x TRL | " + " | ".join(f"{p} s (x TRL)" for p in PHASES)
             + " | response tokens | start-up s |",
             "|---|---|---|" + "---|" * len(PHASES) + "---|---|"]
    for name, runs in (("TRL 1.16 GRPOTrainer", trl), ("ours 1 x 2", ours)):
        cells = [f"{statistics.median(r[p] for r in runs):.3f}"
                 + (f" ({statistics.median(r['ratios'][p] for r in runs):.2f})" if "ratios" in runs[0] else "") for p in PHASES]
        ratio = " / ".join(f"{r['ratio']:.2f}" for r in runs) if "ratio" in runs[0] else "1"
        seconds = " / ".join(f"{r['seconds']:.2f}" for r in runs)
        lines.append(f"| {name} | {seconds} | {ratio} | " + " | ".join(cells)
                     + f" | {statistics.fmean(r['response_length'] for r in runs):.1f}"
                     + f" | {statistics.median(r['startup'] for r in runs):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--runs", type=int, default=2, help="alternating runs of each side, per precision")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--iterations", type=int, default=WORK["iterations"])
    parser.add_argument("--loss-aggregation", choices=list(LOSS_TYPES), default="token_mean",
                        help=f"ours; TRL's loss_type: {LOSS_TYPES}")
    parser.add_argument("--side", nargs=2, metavar=("SIDE", "WORK_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side, path = args.side
        work = json.loads(Path(path).read_text())
        result = (trl_side if side == "trl" else ours_side)(work)
        Path(work["out"]).with_suffix(".result").write_text(json.dumps(result))
        return

    directory = prepare(args.model)
    chats, prompt_tokens = equal_length_prompts(directory / "policy")
    work = WORK | {"iterations": args.iterations, "loss_aggregation": args.loss_aggregation, "chats": chats,
                   "policy": str(directory / "policy"), "reward": str(directory / "reward")}
    print(f"{args.model}: {len(chats)} prompts of {prompt_tokens} tokens; {work['prompts']} x {work['group']} completions of "
          f"<= {work['max_new_tokens']} tokens, μ={work['epochs']} x {work['minibatches']} minibatches, "
          f"{args.loss_aggregation} (TRL {LOSS_TYPES[args.loss_aggregation]}), {args.iterations} iterations", flush=True)
    results: dict[str, tuple[list, list]] = {p: ([], []) for p in args.precision}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.runs):
            for precision in args.precision:
                trl_out = run_side("trl", work | {"precision": precision}, Path(tmp))
                if trl_out["prompt_tokens"] != [prompt_tokens]:
                    raise SystemExit(f"TRL's prompts came to {trl_out['prompt_tokens']} tokens, ours to {prompt_tokens}")
                trl = steady(trl_out["iterations"]) | {"startup": trl_out["startup"]}
                ours_out = run_side("ours", work | {"precision": precision}, Path(tmp))
                ours = steady(ours_out["iterations"]) | {"startup": ours_out["startup"]}
                ours["ratio"] = ours["seconds"] / trl["seconds"]
                ours["ratios"] = {p: ours[p] / trl[p] if trl[p] > 0 else float("nan") for p in PHASES}
                results[precision][0].append(trl)
                results[precision][1].append(ours)
                print(f"run {repeat + 1} {precision}: TRL {trl['seconds']:.3f} s/iteration, ours {ours['seconds']:.3f} "
                      f"({ours['ratio']:.2f} x TRL); mean response {trl['response_length']:.1f} / {ours['response_length']:.1f} "
                      f"tokens", flush=True)

    for precision, (trl, ours) in results.items():
        print(table(precision, trl, ours))
    print("\nTarget: ours <= 0.75 x TRL per iteration. " + "; ".join(
        f"{precision}: median {statistics.median(r['ratio'] for r in ours):.2f} x, "
        + ("met" if statistics.median(r["ratio"] for r in ours) <= 0.75 else "NOT met")
        for precision, (_, ours) in results.items()))


if __name__ == "__main__":
    main()
