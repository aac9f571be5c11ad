"""The propose stage's block: which pairs of a policy's responses people are asked to judge."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr

from rlhf.blocks import StageConfig, Strict
from rlhf.store import digest_tree


class SimulatedAnnotators(Strict):
    """Annotators simulated for demos and tests: they judge through the labelling page's HTTP API, as a browser
    does, from the task's gold reward with Bradley-Terry noise: P(A) = sigmoid((gold(A) - gold(B)) / temperature)."""

    annotators: int = Field(3, ge=1, description="simulated annotators, sim-1 .. sim-N")
    temperature: float = Field(0.1, gt=0, description="the noise: larger is noisier; near-ties of gold are judged at random")
    tie_margin: float = Field(0.0, ge=0, description="gold rewards closer than this are judged a tie, as people call near-equal responses")


class ProposeStage(StageConfig):
    """Pairs of a policy's responses for people to judge, written to the pipeline's queue in the label store as pending:
    two responses per prompt, chosen at random or where the current reward model is least sure."""

    policy: str | None = Field(
        None, description="null: the pipeline's policy (sft); or a registered one, models:/NAME@ALIAS, e.g. models:/demo-policy@champion"
    )
    count: int = Field(2000, ge=1, description="pairs on training prompts")
    eval_count: int = Field(200, ge=0, description="pairs on held-out prompts (the reward stage holds them out)")
    select: Literal["random", "uncertain"] = Field(
        "random", description="random; uncertain: of `candidates` sampled pairs per pair kept, those the reward model scores closest"
    )
    candidates: int = Field(4, ge=1, description="uncertain: sampled pairs per pair kept")
    reward_model: Path | None = Field(
        None, description="uncertain: the reward model that scores them; null: the newest this pipeline trained (random until there is one)"
    )
    overlap: float = Field(0.1, ge=0, le=1, description="share of pairs asked of two annotators, so that their agreement can be measured")
    gold_checks: int = Field(0, ge=0, description="extra pairs whose answer the task's gold reward knows (a clear gap), mixed in to measure each annotator")
    max_new_tokens: int = Field(40, ge=1, description="tokens per response")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    batch_size: int = Field(128, ge=1, description="responses generated at once")
    simulate: SimulatedAnnotators | None = Field(None, description="judge the pairs at once by simulated annotators (demos, tests); null: people judge them")
    _reward_stage: str | None = PrivateAttr(None)

    def check(self, name: str, pipeline) -> None:
        stages = pipeline.stages
        gold = stages.given("data", name).gold()
        if (self.gold_checks or self.simulate) and gold is None:
            key = "gold_checks" if self.gold_checks else "simulate"
            raise ValueError(f"stages.{name}.{key}: needs the task's gold reward (stages.data.gold_reward)")
        if self.policy is None and stages.provider("policy", name) is None:
            raise ValueError(f"stages.{name}.policy: no stage of the pipeline provides a policy: name a registered one, models:/NAME@ALIAS")
        if self.policy is not None and not self.policy.startswith("models:/"):
            raise ValueError(f"stages.{name}.policy: {self.policy!r} is not a registered model, models:/NAME@ALIAS")
        rewards = stages.providing("reward_model")
        self._reward_stage = rewards[0] if rewards else None
        if self.select == "uncertain" and self.reward_model is None and self._reward_stage is None:
            raise ValueError(f"stages.{name}.reward_model: select 'uncertain' needs a reward model, and no stage of the pipeline trains one")

    def external_inputs(self) -> dict[str, str]:
        return {"reward_model": digest_tree(self.reward_model)} if self.select == "uncertain" and self.reward_model else {}

    def live_inputs(self, site) -> dict[str, str]:
        inputs = {}
        if self.policy is not None:
            inputs[f"policy:{self.policy}"] = site.registered_version(self.policy)
        if self.select == "uncertain" and self.reward_model is None:
            newest = site.newest(self._reward_stage)
            inputs["reward_model"] = newest["outputs"]["digest"] if newest else "none yet"
        return inputs
