"""Every adapter of SFT (LoRA and the prompt-learning family from peft) trains, saves, loads and generates."""

import mlflow
import pytest
import torch

from rlhf import evaluation, generation, models, trl_fit
from rlhf.cluster import RayConfig
from rlhf.stages.sft.config import SftStage
from rlhf.data.prepare import write_splits
from rlhf.synthetic_reviews import generate_examples
from rlhf.stages.sft.recipe import make_trainer

ADAPTERS = {
    "lora": {"type": "lora", "r": 4, "alpha": 8},
    "prompt_tuning": {"type": "prompt_tuning", "virtual_tokens": 4, "init_text": "Write a review."},
    "prefix_tuning": {"type": "prefix_tuning", "virtual_tokens": 4, "projection": True, "projection_hidden_size": 16},
    "p_tuning": {"type": "p_tuning", "virtual_tokens": 4, "encoder": "MLP", "encoder_hidden_size": 16},
}


@pytest.mark.parametrize("name", ADAPTERS)
def test_each_adapter_trains_saves_and_loads_for_evaluation(tiny_model, tmp_path, name):
    directory, tokenizer, prompts = tiny_model
    rows = [{"prompt": [{"role": "user", "content": e["prompt"]}], "completion": [{"role": "assistant", "content": e["completion"]}]}
            for e in generate_examples(40, 0.25, seed=1)]
    write_splits({"train": rows[:32], "eval": rows[32:]}, tmp_path / "data" / "instructions")
    config = SftStage(model={"init": "pretrained", "path": str(directory)}, adapter=ADAPTERS[name], learning_rate=0.01,
                      batch_size=8, max_steps=4, eval_steps=4, save_steps=4, max_length=64, samples=0)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        trl_fit.fit(
            lambda output_dir: make_trainer(config.model_dump(mode="json"), 0, directory, tmp_path / "data", 1, output_dir),
            RayConfig(num_workers=1), name="sft", work=tmp_path / "work", outputs=tmp_path / "out", seed=0,
            mlflow_uri=mlflow.get_tracking_uri(), mlflow_run_id=run.info.run_id,
        )
    trained_base = (tmp_path / "out" / "model" / "model.safetensors").read_bytes()
    merged = name == "lora"
    # LoRA merges into the weights; the others keep the base and apply their adapter when loaded
    assert (trained_base != (directory / "model.safetensors").read_bytes()) == merged
    assert (tmp_path / "out" / "model" / models.PROMPT_ADAPTER).is_dir() != merged

    policy = models.load_causal_lm(tmp_path / "out" / "model")
    base = models.load_causal_lm(directory)
    responses, _ = generation.sample(policy, tokenizer, prompts, 8, 1.0, seed=0)
    assert len(responses) == len(prompts)
    ours, theirs = (evaluation.sequence_logprobs(m, tokenizer, prompts, responses) for m in (policy, base))
    assert all(torch.isfinite(torch.tensor(ours))) and ours != theirs  # the adapter is applied and changes the policy
    lengths = {len(tokenizer(generation.render(tokenizer, p, r)).input_ids) for p, r in zip(prompts, responses)}
    assert len(lengths) > 1  # so that the batch below is padded
    assert ours == pytest.approx(evaluation.sequence_logprobs(policy, tokenizer, prompts, responses, batch_size=1), abs=1e-4)
