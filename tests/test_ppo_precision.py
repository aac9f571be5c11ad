"""`precision: bf16` in an RL stage: the frozen models held in bf16, LoRA, critic and optimiser in fp32,
log-probs that track fp32's, and a stage that trains and saves an fp32 adapter."""

import json
import math

import mlflow
import torch
from safetensors.torch import load_file

from rlhf.cluster import RayConfig

from rlhf.stages.rl.config import PpoStage
from rlhf.ppo import algorithm as A
from rlhf.ppo import driver
from rlhf.ppo.roles import load, response_logits

CPU = torch.device("cpu")


def _roles(directory, precision: str):
    torch.manual_seed(0)
    return load(directory, directory, PpoStage(precision=precision, critic_lora=None), None, CPU)


def test_bf16_holds_the_frozen_models_in_bf16_and_what_trains_in_fp32(tiny_model):
    roles = _roles(tiny_model[0], "bf16")
    frozen = [p for p in roles.actor.parameters() if not p.requires_grad] + list(roles.reward.parameters())
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    trainable = [p for params in roles.trainable().values() for p in params]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.float32 for p in roles.critic.parameters())
    assert all(b.dtype == torch.float32 for b in roles.actor.buffers() if b.is_floating_point())  # rotary frequencies


def test_bf16_log_probs_track_fp32(tiny_model):
    directory, tokenizer, _ = tiny_model
    fp32, bf16 = _roles(directory, "fp32"), _roles(directory, "bf16")
    for roles in (fp32, bf16):  # the same non-zero adapter in both, so the LoRA path counts
        with torch.no_grad():
            for param in roles.actor.parameters():
                if param.requires_grad:
                    param.copy_(torch.linspace(-0.2, 0.2, param.numel()).view_as(param))
    query = torch.randint(5, len(tokenizer), (4, 12), generator=torch.Generator().manual_seed(0))
    response = torch.randint(5, len(tokenizer), (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(query)
    with torch.no_grad():
        want = A.token_logprobs(response_logits(fp32.actor, query, mask, response), response, 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = A.token_logprobs(response_logits(bf16.actor, query, mask, response), response, 1.0)
            with bf16.reference():
                reference = A.token_logprobs(response_logits(bf16.actor, query, mask, response), response, 1.0)
    assert (got - want).abs().max() < 0.05
    assert (got - reference).abs().max() > 0.1  # the adapter is applied, not lost to bf16 rounding


def test_a_bf16_stage_trains_and_saves_an_fp32_adapter(tiny_model, tmp_path):
    directory, _, prompts = tiny_model
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.MlflowClient().create_run("0")
    ppo = PpoStage(iterations=3, batch_size=4, epochs=2, max_new_tokens=10, normalisation_samples=4, precision="bf16",
                   critic_lora=None)
    final = driver.run(
        "ppo", ppo, RayConfig(num_workers=1, cpus_per_worker=1), name="ppo-bf16", storage=tmp_path / "ppo", seed=0,
        policy_model=directory, reward_model=directory, critic_lora=None, prompts=prompts, gold="synthetic_reviews",
        mlflow_uri=mlflow.get_tracking_uri(), mlflow_run_id=run.info.run_id,
    )
    history = json.loads((final / "history.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2, 3]
    assert all(math.isfinite(h[key]) for h in history for key in ("policy_loss", "value_loss", "kl", "score"))
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)  # it trained: B starts at zero
