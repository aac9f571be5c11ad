"""The evaluate stage's block."""

from __future__ import annotations

from pydantic import Field

from rlhf.blocks import Precision, StageConfig, Strict


class HackingCheck(Strict):
    """Warn of reward hacking: the reward model's gain is large while the gold gain is small or negative."""

    min_score_gain: float = Field(1.0, description="reward-model gain (in normalised units) that counts as large")
    max_gold_gain: float = Field(0.1, description="gold gain at or below which the rise is not real")


class RegistryGates(Strict):
    """When the PPO policy is registered as `<pipeline>-policy` (alias `candidate`)."""

    min_win_rate: float = Field(0.5, ge=0, le=1, description="over the baseline; under gold when the task has one")
    max_kl: float = Field(30.0, gt=0, description="nats per sequence to the baseline (SFT or starting) policy")
    min_human_win_rate: float | None = Field(
        None, ge=0, le=1, description="people as the last gate: the evaluation queues candidate-against-baseline pairs, and "
        "`rlhf promote` refuses `champion` until people prefer the candidate this often (a tie counts half); null: no human gate",
    )
    min_human_judgements: int = Field(50, ge=1, description="judgements of those pairs `rlhf promote` needs first")
    human_pairs: int = Field(100, ge=1, description="candidate-against-baseline pairs queued, from the evaluation's held-out generations")


class EvaluateStage(StageConfig):
    """A candidate policy against a baseline on held-out prompts, same sampling settings and seeds."""

    candidate: str | None = Field(None, description="the stage whose policy is evaluated (ppo, grpo, dpo, ...); null: the pipeline's only one besides sft")
    baseline: str | None = Field(None, description="a policy stage, or 'start': the model the candidate started from; null: sft when the pipeline has it")

    prompts: int = Field(128, ge=1, description="generations per policy, cycling through the held-out prompts")
    max_new_tokens: int = Field(40, ge=1, description="tokens per response, as both policies sample them")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of both policies")
    precision: Precision = Field(
        "auto", description="bf16: both policies and the reward model held in bf16 to sample and score; auto: bf16 for a "
        "pretrained policy where the hardware computes bf16 natively (CUDA, AVX512-BF16, AMX), else fp32",
    )
    hacking: HackingCheck = Field(HackingCheck(), description="when the evaluation warns of reward hacking")
    registry: RegistryGates | None = Field(RegistryGates(), description="null never registers")

    def also_reads(self) -> tuple[str, ...]:
        return (self.candidate,) + ((self.baseline,) if self.baseline != "start" else ())

    def check(self, name: str, pipeline) -> None:
        stages = pipeline.stages
        policies = stages.providing("policy")
        if self.candidate is None:
            tuned = stages.tuned()
            if len(tuned) != 1:
                raise ValueError(f"stages.{name}.candidate: name the policy to evaluate, one of: {', '.join(policies) or 'none here'}")
            self.candidate = tuned[0]
        if self.baseline is None:
            start = stages.provider("policy", name)
            self.baseline = start if start is not None and start != self.candidate else "start"
        for key, allowed in (("candidate", policies), ("baseline", [*policies, "start"])):
            if getattr(self, key) not in allowed:
                raise ValueError(f"stages.{name}.{key}: {getattr(self, key)!r} is not one of this pipeline's policies: "
                                 f"{', '.join(allowed) or 'none'}")
        if self.candidate == self.baseline:
            raise ValueError(f"stages.{name}.baseline: the candidate ({self.candidate}) compared with itself")
