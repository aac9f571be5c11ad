"""The blocks of the RL stages: PPO, GRPO, RLOO, REINFORCE++, one engine (`rlhf/ppo/`) and its registered
estimators (`rlhf/ppo/methods.py`).

A new RL method is an estimator registered there, its block here (a `@method` that names its stage) and
its block in `pipelines.yaml`: the stage graph declares every method of `METHODS`, run by this room's recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlhf.blocks import Lora, Precision, PretrainedModel, StageConfig, Strict, given_reward_model

METHODS: dict[str, type[RlStage]] = {}  # stage name -> its block


def method(stage: str):
    """Declare an RL method: its block becomes the stage `stage`."""
    def declare(config: type[RlStage]) -> type[RlStage]:
        METHODS[stage] = config
        return config

    return declare


class KLPenalty(Strict):
    """The KL coefficient beta: fixed, or adaptive towards `target` (nats per sequence)."""

    beta: float = Field(0.05, ge=0, description="the coefficient (the starting one when adaptive)")
    target: float | None = Field(6.0, gt=0, description="null keeps beta fixed")
    horizon: int = Field(10000, ge=1, description="responses over which an adaptive beta moves by its full error")
    min_beta: float = Field(
        0.0, ge=0, description="the least an adaptive beta falls to: a short horizon otherwise drops it while the KL is small, "
        "and it climbs back too late"
    )
    estimator: Literal["k1", "k3"] = Field("k1", description="k1: log-ratio (unbiased, signed per token); k3: (r - 1) - log r (unbiased, never negative)")
    in_loss: bool = Field(False, description="a KL term in the loss (GRPO's way) instead of a penalty in the reward")

    @model_validator(mode="after")
    def _floor_below_start(self) -> KLPenalty:
        if self.min_beta > self.beta:
            raise ValueError(f"min_beta ({self.min_beta}) is above beta ({self.beta}): beta starts at or above its floor")
        return self


LossAggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


class RlStage(StageConfig):
    """What the RL stages share: a LoRA policy on the SFT model (or `policy`), trained on Ray Train against
    the reward model with the clipped surrogate loss; they differ in how they turn scores into advantages
    (`estimator`, registered in `rlhf/ppo/methods.py`). Dropout is off in every model (LoRA's too), so the
    log-probs of the rollout and of the first update agree."""

    has_critic: ClassVar[bool] = False
    estimator: str
    policy_loss: Literal["clip"] = Field("clip", description="the per-token policy loss: clip, PPO's clipped surrogate")
    loss_aggregation: LossAggregation = Field(
        "token_mean",
        description="how per-token losses become one: token_mean (every token of the minibatch alike, DAPO), "
        "seq_mean_token_mean (each response's mean, then their mean: GRPO as published), seq_mean_token_sum_norm "
        "(each response's sum over max_new_tokens: Dr. GRPO)",
    )
    policy: PretrainedModel | None = Field(None, description="the starting policy when the pipeline has no sft stage")
    reward_model: Path | None = Field(
        None, description="a trained reward model (directory with its tokenizer) when the pipeline has no reward stage"
    )
    iterations: int = Field(80, ge=1, description="rollout-and-update iterations")
    batch_size: int = Field(32, ge=1, description="prompts per iteration, over all workers")
    samples_per_prompt: int = Field(1, ge=1, description="responses sampled for each prompt")
    max_prompt_tokens: int | None = Field(None, ge=1, description="prompts longer than this, rendered, are left out")
    max_new_tokens: int = Field(40, ge=1, description="tokens per sampled response")
    temperature: float = Field(1.0, gt=0, description="sampling temperature, the same in rollout, reference and training log-probs")
    epochs: int = Field(4, ge=1, description="epochs over each rollout batch")
    minibatches: int = Field(4, ge=1, description="optimiser steps per epoch; each minibatch spans all workers")
    learning_rate: float = Field(1e-3, gt=0, description="policy (LoRA) learning rate")
    lora: Lora = Field(Lora(), description="the policy's LoRA adapter; its reference is the same model with the adapter off")
    normalisation_samples: int = Field(
        64, ge=2, description="samples of the starting policy, under these sampling settings, that fix the score mean and std"
    )
    precision: Precision = Field(
        "auto", description="bf16: the frozen policy and reward model held in bf16, matmuls autocast; LoRA, critic and optimizer "
        "state stay fp32; auto: bf16 for a pretrained policy where the hardware computes bf16 natively (CUDA, AVX512-BF16, AMX), else fp32"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, more time")
    micro_batch_size: int | None = Field(
        None, ge=1, description="sequences per forward/backward; gradients accumulate over a minibatch (null: all at once)"
    )
    kl: KLPenalty = Field(KLPenalty(), description="the KL to the reference (the starting policy)")
    clip_ratio: float = Field(0.2, gt=0, description="the policy ratio's clip range: 1 +- clip_ratio")
    reward_clip: float | None = Field(5.0, gt=0, description="normalised scores clipped to +-reward_clip; null: no clip")
    missing_eos_penalty: float | None = Field(None, description="score given to responses that hit the length limit")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clipping")
    checkpoint_every: int = Field(10, ge=1, description="iterations between Ray Train checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk")
    samples_every: int = Field(20, ge=1, description="iterations between sample tables in MLflow")
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from")


    def check(self, name: str, pipeline) -> None:
        for need in ("policy", "reward_model"):
            given, provider = getattr(self, need) is not None, pipeline.stages.provider(need, name)
            if provider is None and not given:
                raise ValueError(f"stages.{name}.{need} is required when no stage of the pipeline provides a {need.replace('_', ' ')}")
            if provider is not None and given:
                raise ValueError(f"stages.{name}.{need}: the {provider} stage provides it; remove one of the two")
        workers = pipeline.ray.num_workers
        if self.batch_size % (workers * self.minibatches):
            raise ValueError(
                f"stages.{name}.batch_size ({self.batch_size}) must be a multiple of ray.num_workers x stages.{name}.minibatches "
                f"({workers} x {self.minibatches}): every worker takes an equal shard of each batch and splits it into "
                "equal minibatches"
            )

    def starts_from_policy(self) -> bool:
        return True

    def own_model(self) -> PretrainedModel | None:
        return self.policy

    def external_inputs(self) -> dict[str, str]:
        return given_reward_model(self.reward_model)


@method("ppo")
class PpoStage(RlStage):
    """PPO: per-token rewards (the score at the end, a KL penalty at every token) and GAE advantages
    from a critic that starts as a copy of the reward model, whitened over the batch."""

    has_critic: ClassVar[bool] = True
    estimator: Literal["gae"] = Field("gae", description="gae: advantages from a critic")
    critic_learning_rate: float = Field(1e-3, gt=0, description="the critic's learning rate")
    critic_lora: Lora | Literal["auto"] | None = Field(
        "auto", description="null trains the critic fully; auto: LoRA r16 on a pretrained base, full on a scratch one"
    )
    clip_value: float = Field(0.2, gt=0, description="how far the critic's values may move from the rollout's in one update")
    gamma: float = Field(1.0, ge=0, le=1, description="discount of the per-token rewards")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda: 1 weighs the rewards ahead, 0 the critic's next value")


class GroupStage(RlStage):
    samples_per_prompt: int = Field(4, ge=2, description="responses sampled for each prompt, compared with each other")


@method("grpo")
class GrpoStage(GroupStage):
    """GRPO (Shao et al. 2024): no critic; each response's advantage is its reward normalised within the
    responses to the same prompt; the KL to the reference is a loss term (k3)."""

    estimator: Literal["grpo"] = Field("grpo", description="grpo: the group-normalised reward")
    kl: KLPenalty = Field(KLPenalty(beta=0.04, target=None, estimator="k3", in_loss=True), description="the KL to the reference, a k3 term in the loss")


@method("drgrpo")
class DrGrpoStage(GroupStage):
    """Dr. GRPO (Liu et al. 2025): GRPO without its two biases. The advantage is the reward minus the group mean
    (no division by the group's std), and each response's loss is its token sum over a constant, max_new_tokens
    (no division by its own length), so neither a prompt's difficulty nor a response's length reweighs it."""

    estimator: Literal["dr_grpo"] = Field("dr_grpo", description="dr_grpo: r minus the group mean")
    loss_aggregation: LossAggregation = Field("seq_mean_token_sum_norm", description=RlStage.model_fields["loss_aggregation"].description)
    kl: KLPenalty = Field(KLPenalty(beta=0.04, target=None, estimator="k3", in_loss=True), description="the KL to the reference, a k3 term in the loss (as GRPO)")


@method("rloo")
class RlooStage(GroupStage):
    """RLOO (Ahmadian et al. 2024): no critic; each response's reward, the KL penalty included, minus the
    mean reward of the other responses to the same prompt."""

    estimator: Literal["rloo"] = Field("rloo", description="rloo: r minus the mean of the other responses to its prompt")


@method("reinforce")
class ReinforceStage(RlStage):
    """REINFORCE++ (Hu 2025): no critic; per-token rewards as PPO's, returns-to-go whitened over the whole
    batch as advantages."""

    estimator: Literal["reinforce++"] = Field("reinforce++", description="reinforce++: returns-to-go whitened over the batch")
    gamma: float = Field(1.0, ge=0, le=1, description="discount of the per-token rewards in the returns-to-go")
