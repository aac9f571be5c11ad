"""The SFT stage's block."""

from __future__ import annotations

from pydantic import Field, model_validator

from rlhf.blocks import Adapter, LoraAdapter, ModelSource, ScratchModel
from rlhf.trainer_args import Training

class SftStage(Training):
    """Instruction SFT with TRL's SFTTrainer; loss on the completion only.

    Without instruction data it trains on the chosen replies of the preference pairs.
    """

    _trl_config = "SFTConfig"
    model: ModelSource = Field(description="scratch (a tokenizer and model built from the data) or pretrained")
    adapter: Adapter | None = Field(None, description="null trains the whole model; else lora, prompt_tuning, prefix_tuning or p_tuning")
    samples: int = Field(8, ge=0, description="eval prompts to generate for the samples table")
    max_new_tokens: int = Field(48, ge=1, description="tokens per response in the samples table")

    @model_validator(mode="after")
    def _scratch_is_full(self) -> SftStage:
        if isinstance(self.model, ScratchModel) and self.adapter is not None:
            raise ValueError("a scratch model starts from random weights: train it fully (adapter: null)")
        return self

    def own_model(self) -> ModelSource:
        return self.model

    def check(self, name: str, pipeline) -> None:
        super().check(name, pipeline)
        if self.adapter is None or isinstance(self.adapter, LoraAdapter):
            return
        stages = pipeline.stages
        builds_on = [s for s in stages.declared() if stages.provider("policy", s) == name and stages.block(s).starts_from_policy()]
        if builds_on:
            raise ValueError(
                f"stages.{name}.adapter: a {self.adapter.type} policy cannot be merged into a model for "
                f"{', '.join(builds_on)} to start from; use lora or train the whole model"
            )
