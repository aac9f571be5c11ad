"""The reward stage's block, and the pair sources it shares with DPO."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from rlhf.blocks import Lora, ModelSource, Strict
from rlhf.trainer_args import Training

class Pairs(Strict):
    """A source of preference pairs."""

    def live_inputs(self, site) -> dict[str, str]:
        return {}

    def waiting(self, site) -> str | None:
        return None


class SampledPairs(Pairs):
    """Two samples per prompt from the starting policy (the SFT model, else the stage's own), held-out pairs
    from held-out prompts."""

    source: Literal["policy"] = Field(description="policy")
    count: int = Field(3000, ge=2, description="training pairs")
    eval_count: int = Field(300, ge=2, description="held-out pairs, from held-out prompts")
    max_new_tokens: int = Field(40, ge=1, description="tokens per sampled response")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    batch_size: int = Field(128, ge=1, description="responses generated at once (a small model samples faster in bigger batches)")


class PolicyPairs(SampledPairs):
    """Sampled pairs ordered by the task's gold reward (reward-model training)."""

    min_gold_gap: float = Field(0.25, ge=0, description="pairs whose gold rewards differ less are dropped")


class DataPairs(Pairs):
    """The preference pairs of the data stage."""

    source: Literal["data"] = Field(description="data")


class LabelPairs(Pairs):
    """Pairs people judged on the labelling page (`rlhf label`): the pipeline's queue in the label store. The majority
    over the annotators decides each item; ties, both-bad and split items are dropped and counted. Held-out pairs are
    those on held-out prompts. Its fingerprint covers the judgements: new ones train again."""

    source: Literal["labels"] = Field(description="labels")
    count: int = Field(2000, ge=2, description="judged pairs needed before the stage trains; until then a run stops before it, saying how many there are")
    min_gold_accuracy: float | None = Field(
        None, ge=0, le=1, description="leave out annotators less accurate on gold-check items (those who judged none are kept); null keeps everyone"
    )

    def live_inputs(self, site) -> dict[str, str]:
        return {f"judgements:{site.queue}": site.store().digest(site.queue)}

    def waiting(self, site) -> str | None:
        pairs, _ = site.store().preference_pairs(site.queue, self.min_gold_accuracy)
        if len(pairs) >= self.count:
            return None
        return f"waiting for judgements: {len(pairs):,} of {self.count:,} pairs judged; judge them at {site.labels.page}"


class TrainsOnPairs:
    """A stage block whose `pairs` may be people's judgements, which it then waits for and is fingerprinted by."""

    def live_inputs(self, site) -> dict[str, str]:
        return self.pairs.live_inputs(site)

    def waiting(self, site) -> str | None:
        return self.pairs.waiting(site)

    def reads_judgements(self) -> bool:
        return isinstance(self.pairs, LabelPairs)


class RewardStage(TrainsOnPairs, Training):
    """A scalar-head reward model trained on preference pairs with TRL's RewardTrainer."""

    _trl_config = "RewardConfig"
    model: ModelSource | None = Field(None, description="null: the SFT stage's model")
    lora: Lora | None = Field(None, description="LoRA on the reward model's base (the score head trains fully); null trains the whole model")
    pairs: Annotated[Union[PolicyPairs, DataPairs, LabelPairs], Field(discriminator="source", description="policy: sampled from the SFT policy and ordered by gold; data: the data stage's preferences; labels: people's judgements")]

    def starts_from_policy(self) -> bool:
        return self.model is None

    def own_model(self) -> ModelSource | None:
        return self.model

    def check(self, name: str, pipeline) -> None:
        super().check(name, pipeline)
        stages = pipeline.stages
        if stages.provider("policy", name) is None and self.model is None:
            raise ValueError(f"stages.{name}.model is required when no stage of the pipeline provides a policy")
        if isinstance(self.pairs, PolicyPairs) and stages.given("data", name).gold() is None:
            raise ValueError(
                f"stages.{name}.pairs.source 'policy' labels samples with a gold reward: set stages.data.gold_reward or use 'data'"
            )
