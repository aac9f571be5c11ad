"""Where a stage's starting policy and reward model come from: a stage of the pipeline that provides them
(SFT's policy, the reward stage's model), else the stage's own block (`policy`, `reward_model`)."""

from __future__ import annotations

from pathlib import Path

from rlhf import models
from rlhf.lifecycle import StageContext


def starting_policy(ctx: StageContext, stage: str) -> Path:
    """The policy `stage` starts from, a pretrained one prepared under the home."""
    provided = ctx.input("policy")
    if provided is not None:
        return provided / "model"
    return models.pretrained_dir(ctx.pipeline.stages.block(stage).policy, ctx.home, f"stages.{stage}.policy")


def reward_model(ctx: StageContext, stage: str) -> Path:
    """The reward model `stage` optimises or is scored by."""
    provided = ctx.input("reward_model")
    return provided / "model" if provided is not None else ctx.pipeline.stages.block(stage).reward_model
