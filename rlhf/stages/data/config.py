"""The data stage's block: instruction data, preference pairs and prompts, and the task's gold reward."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rlhf.blocks import FileSource, HubSource, InstructionSource, PreferenceSource, StageConfig, SyntheticReviewsSource
from rlhf.data.sources import describe, digest

GoldReward = Literal["synthetic_reviews", "vader_positive"]


class DataStage(StageConfig):
    """Instruction data for SFT, preference pairs for the reward model, prompts for PPO."""

    instructions: InstructionSource | None = Field(None, description="prompt/completion or chat rows for SFT: synthetic_reviews, file or hub")
    preferences: PreferenceSource | None = Field(None, description="prompt/chosen/rejected or HH-RLHF rows for the reward model: file or hub")
    prompts: PreferenceSource | None = Field(None, description="extra prompts (rows with a `prompt`) for PPO and evaluation")
    gold_reward: GoldReward | None = Field(
        None, description="the task's known truth (rlhf/gold.py); synthetic_reviews data implies synthetic_reviews"
    )
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="share of prompts held out")

    @model_validator(mode="after")
    def _needs_data(self) -> DataStage:
        if self.instructions is None and self.preferences is None and self.prompts is None:
            raise ValueError("give at least one of 'instructions', 'preferences' or 'prompts'")
        return self

    def gold(self) -> str | None:
        if self.gold_reward is None and isinstance(self.instructions, SyntheticReviewsSource):
            return "synthetic_reviews"
        return self.gold_reward

    def external_inputs(self) -> dict[str, str]:
        sources = {role: getattr(self, role) for role in ("instructions", "preferences", "prompts")}
        return {f"{role}:{describe(s)}": digest(s) for role, s in sources.items() if isinstance(s, (FileSource, HubSource))}
