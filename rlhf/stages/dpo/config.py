"""The DPO stage's block."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Union

from pydantic import Field

from rlhf.blocks import Adapter, LoraAdapter, PretrainedModel, given_reward_model
from rlhf.stages.reward.config import DataPairs, LabelPairs, SampledPairs, TrainsOnPairs
from rlhf.trainer_args import Training

class RewardModelPairs(SampledPairs):
    """Sampled pairs ordered by the reward model's score (on-policy DPO)."""

    min_score_gap: float = Field(0.0, ge=0, description="pairs whose reward-model scores differ less are dropped")


class DpoStage(TrainsOnPairs, Training):
    """DPO with TRL's DPOTrainer: a LoRA policy on the SFT model (or `policy`), its reference the same model
    without the adapter, on the data stage's preference pairs or on pairs it samples and the reward model labels."""

    _trl_config = "DPOConfig"
    policy: PretrainedModel | None = Field(None, description="the starting policy when the pipeline has no sft stage")
    reward_model: Path | None = Field(
        None, description="a trained reward model that labels policy pairs when the pipeline has no reward stage"
    )
    pairs: Annotated[Union[RewardModelPairs, DataPairs, LabelPairs], Field(discriminator="source", description="policy: sampled from the starting policy and ordered by the reward model; data: the data stage's preferences; labels: people's judgements")]
    beta: float = Field(0.1, gt=0, description="DPO's temperature: how far the policy may move from the reference")
    adapter: Adapter = Field(LoraAdapter(type="lora"), description="the policy's adapter: lora, prompt_tuning, prefix_tuning or p_tuning")
    max_new_tokens: int = Field(40, ge=1, description="what the registered policy generates by default")

    def check(self, name: str, pipeline) -> None:
        super().check(name, pipeline)
        stages = pipeline.stages
        if (stages.provider("policy", name) is None) == (self.policy is None):
            raise ValueError(f"stages.{name}.policy: give it exactly when no stage of the pipeline provides a policy")
        labels = isinstance(self.pairs, RewardModelPairs)
        if labels and (stages.provider("reward_model", name) is None) == (self.reward_model is None):
            raise ValueError(f"stages.{name}.reward_model: give it exactly when no stage of the pipeline provides a reward model")
        if isinstance(self.pairs, DataPairs) and stages.given("data", name).preferences is None:
            raise ValueError(f"stages.{name}.pairs.source 'data' needs stages.data.preferences")

    def starts_from_policy(self) -> bool:
        return True

    def own_model(self) -> PretrainedModel | None:
        return self.policy

    def external_inputs(self) -> dict[str, str]:
        return given_reward_model(self.reward_model)
