"""TRL 1.12's PPOTrainer on the work `ppo_vs_trl.py` prepares; runs in TRL's own venv, never imports `rlhf`.

    trl-venv/bin/python trl_ppo_reference.py WORK_DIR OUT_JSON

WORK_DIR holds `policy/` (a causal LM with its tokenizer), `reward/` (a
sequence classifier, also the value model's start), `prompts.json` (token
ids of equal length) and `work.json` (batch, epochs, minibatches, tokens,
temperature, LoRA rank, learning rate, iterations, threads). Phases are
timed by wrapping, not editing, what `PPOTrainer.train()` calls.
"""

import json
import sys
import time
from pathlib import Path


def main() -> None:
    work_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    work = json.loads((work_dir / "work.json").read_text())

    import torch

    torch.set_num_threads(work["threads"])
    torch.manual_seed(0)
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(work_dir / "policy", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(work_dir / "policy")
    value = AutoModelForSequenceClassification.from_pretrained(work_dir / "reward", num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(work_dir / "reward", num_labels=1)
    prompts = json.loads((work_dir / "prompts.json").read_text())

    phases: dict[str, float] = {}

    def timed(function, phase):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            key = phase(*args) if callable(phase) else phase
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - start
            return result

        return wrapper

    rollout_or_train = lambda *_: "score" if not torch.is_grad_enabled() else "train"  # noqa: E731
    ppo_module.batch_generation = timed(ppo_module.batch_generation, "generate")
    ppo_module.forward = timed(ppo_module.forward, rollout_or_train)
    ppo_module.get_reward = timed(ppo_module.get_reward, rollout_or_train)
    ppo_module.selective_log_softmax = timed(ppo_module.selective_log_softmax, rollout_or_train)

    iterations = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            self.start = time.perf_counter()
            phases.clear()

        def on_step_end(self, *args, **kwargs):
            now = time.perf_counter()
            iterations.append({"seconds": now - self.start, **phases})
            phases.clear()
            self.start = now

    config = PPOConfig(
        output_dir=str(work_dir / "trl-out"),
        per_device_train_batch_size=work["batch"],
        local_rollout_forward_batch_size=work["batch"],
        gradient_accumulation_steps=1,
        num_mini_batches=work["minibatches"],
        num_ppo_epochs=work["epochs"],
        response_length=work["max_new_tokens"],
        temperature=work["temperature"],
        total_episodes=work["batch"] * work["iterations"],
        learning_rate=work["learning_rate"],
        stop_token=None,
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        bf16=False,  # TRL's default bf16=True raises on a CPU-only host, and it would not autocast anyway
        seed=0,
    )
    lora = LoraConfig(r=work["lora_r"], lora_alpha=2 * work["lora_r"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward, value_model=value,
        train_dataset=Dataset.from_dict({"input_ids": prompts}), peft_config=lora, callbacks=[Clock()],
    )
    trainer.accelerator.backward = timed(trainer.accelerator.backward, "train")
    trainer.optimizer.step = timed(trainer.optimizer.step, "train")
    trainer.train()
    out.write_text(json.dumps(iterations))


if __name__ == "__main__":
    main()
