"""Typed schema of `pipelines.yaml`, `--set` overrides and loading.

Every model forbids unknown keys, so a typo is an error that names its dotted
path and the keys allowed there instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from datetime import datetime
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Optional, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from rlhf.errors import InputError

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StageConfig(Strict):
    """A block under `stages:`; the stage graph (`rlhf/graph.py`) says which stage it configures."""

    def also_reads(self) -> tuple[str, ...]:
        """Upstream stages the block names itself, beyond those the graph declares."""
        return ()

    def check(self, name: str, pipeline: Pipeline) -> None:
        """Rules that involve other blocks; a ValueError names the dotted key."""

    def external_inputs(self) -> dict[str, str]:
        """Digests of what the stage reads from outside the store: part of its fingerprint."""
        return {}


# ----------------------------------------------------------------- data sources


class SyntheticReviewsSource(Strict):
    """The demo task: seeded product reviews with a known gold reward."""

    source: Literal["synthetic_reviews"]
    examples: int = Field(20000, ge=10, description="instruction examples to generate")
    positive_share: float = Field(0.25, ge=0, le=1, description="share of positive reviews")


class FileSource(Strict):
    """A local jsonl, json, parquet or csv file."""

    source: Literal["file"]
    path: Path
    format: Literal["auto", "jsonl", "json", "parquet", "csv"] = "auto"
    on_invalid: Literal["error", "drop"] = Field(
        "error", description="an invalid row stops the stage (error) or is dropped and counted"
    )


class HubSource(Strict):
    """A data set on the Hugging Face hub, through `datasets.load_dataset`."""

    source: Literal["hub"]
    name: str
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    on_invalid: Literal["error", "drop"] = "error"


InstructionSource = Annotated[
    Union[SyntheticReviewsSource, FileSource, HubSource], Field(discriminator="source")
]
PreferenceSource = Annotated[Union[FileSource, HubSource], Field(discriminator="source")]


GoldReward = Literal["synthetic_reviews", "vader_positive"]


class DataStage(StageConfig):
    """Instruction data for SFT, preference pairs for the reward model, prompts for PPO."""

    instructions: InstructionSource | None = None
    preferences: PreferenceSource | None = None
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
        from rlhf.data.sources import describe, digest

        sources = {role: getattr(self, role) for role in ("instructions", "preferences", "prompts")}
        return {f"{role}:{describe(s)}": digest(s) for role, s in sources.items() if isinstance(s, (FileSource, HubSource))}


# ----------------------------------------------------------------------- models


class ScratchModel(Strict):
    """A byte-level BPE tokenizer trained on the stage's text and a Llama-style model from random weights."""

    init: Literal["scratch"]
    vocab_size: int = Field(1024, ge=300)
    hidden_size: int = Field(128, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_positions: int = Field(256, ge=16)


class PretrainedModel(Strict):
    """A model from a local directory, a hub id (`HF_HUB_OFFLINE` respected) or a folder inside a Python package."""

    init: Literal["pretrained"]
    path: str = Field(description="a directory, a hub id, or `package:NAME` for the folder of an installed package")
    gguf_file: str | None = Field(None, description="a GGUF file in `path`, dequantised once and cached under the home")
    revision: str | None = None
    trust_remote_code: bool = False
    pickled_weights: bool = Field(False, description="also load *.bin weights (torch pickles, which can run code); safetensors only by default")


ModelSource = Annotated[Union[ScratchModel, PretrainedModel], Field(discriminator="init")]


class Lora(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class LoraAdapter(Lora):
    """LoRA (Hu et al. 2021): low-rank updates to the weights, merged into the model after training."""

    type: Literal["lora"]


class PromptTuning(Strict):
    """Prompt tuning (Lester et al. 2021): trained embeddings of virtual tokens before the input."""

    type: Literal["prompt_tuning"]
    virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = Field(None, description="start the virtual tokens from this text's embeddings (else random)")


class PrefixTuning(Strict):
    """Prefix tuning (Li and Liang 2021): trained keys and values of virtual tokens at every layer."""

    type: Literal["prefix_tuning"]
    virtual_tokens: int = Field(20, ge=1)
    projection: bool = Field(False, description="reparameterise the prefix through a two-layer MLP while training")
    projection_hidden_size: int | None = Field(None, ge=1, description="the MLP's width; null: the model's hidden size")


class PTuning(Strict):
    """P-tuning (Liu et al. 2021): virtual token embeddings produced by a small trained encoder."""

    type: Literal["p_tuning"]
    virtual_tokens: int = Field(20, ge=1)
    encoder: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = Field(None, ge=1, description="null: the model's hidden size")


Adapter = Annotated[Union[LoraAdapter, PromptTuning, PrefixTuning, PTuning], Field(discriminator="type")]


Precision = Literal["fp32", "bf16"]


class Training(StageConfig):
    """Trainer settings shared by the SFT and reward stages."""

    _trl_config: ClassVar[str]  # the TRL config class `trainer_args` must fit

    learning_rate: float = Field(gt=0)
    batch_size: int = Field(32, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="stop after this many steps; -1 runs all epochs")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(128, ge=8, description="tokens per example, prompt included")
    eval_steps: int = Field(50, ge=1)
    eval_rows: int = Field(512, ge=1, description="held-out rows used for each evaluation")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (resume point)")
    save_total_limit: int = Field(2, ge=1)
    logging_steps: int = Field(10, ge=1)
    precision: Precision = Field("fp32", description="bf16: mixed precision (weights, LoRA and optimizer state stay fp32)")
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = Field(1, ge=1)
    trainer_args: dict[str, Any] = Field({}, description="any other TRL config key, validated by TRL's own class")

    @field_validator("trainer_args")
    @classmethod
    def _trl_accepts(cls, extra: dict[str, Any]) -> dict[str, Any]:
        if extra:
            from rlhf.training import check_trainer_args

            check_trainer_args(cls._trl_config, extra)
        return extra

    def check(self, name: str, pipeline: Pipeline) -> None:
        workers = pipeline.ray.num_workers
        if self.batch_size % workers:
            raise ValueError(
                f"stages.{name}.batch_size ({self.batch_size}) must be a multiple of ray.num_workers ({workers}): "
                "it is the batch of one step, split equally over the workers"
            )


class SftStage(Training):
    """Instruction SFT with TRL's SFTTrainer; loss on the completion only.

    Without instruction data it trains on the chosen replies of the preference pairs.
    """

    _trl_config = "SFTConfig"
    model: ModelSource
    adapter: Adapter | None = Field(None, description="null trains the whole model; else lora, prompt_tuning, prefix_tuning or p_tuning")
    samples: int = Field(8, ge=0, description="eval prompts to generate for the samples table")
    max_new_tokens: int = Field(48, ge=1)

    @model_validator(mode="after")
    def _scratch_is_full(self) -> SftStage:
        if isinstance(self.model, ScratchModel) and self.adapter is not None:
            raise ValueError("a scratch model starts from random weights: train it fully (adapter: null)")
        return self

    def check(self, name: str, pipeline: Pipeline) -> None:
        super().check(name, pipeline)
        if self.adapter is None or isinstance(self.adapter, LoraAdapter):
            return
        from rlhf.graph import GRAPH

        builds_on = [s for s in pipeline.stages.declared() if name in GRAPH[s].reads and s not in ("evaluate", "reward")]
        if builds_on or (pipeline.stages.reward is not None and pipeline.stages.reward.model is None):
            raise ValueError(
                f"stages.{name}.adapter: a {self.adapter.type} policy cannot be merged into a model for "
                f"{', '.join(builds_on) or 'reward'} to start from; use lora or train the whole model"
            )


class SampledPairs(Strict):
    """Two samples per prompt from the starting policy (the SFT model, else the stage's own), held-out pairs
    from held-out prompts."""

    source: Literal["policy"]
    count: int = Field(3000, ge=2, description="training pairs")
    eval_count: int = Field(300, ge=2, description="held-out pairs, from held-out prompts")
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(128, ge=1, description="responses generated at once (a small model samples faster in bigger batches)")


class PolicyPairs(SampledPairs):
    """Sampled pairs ordered by the task's gold reward (reward-model training)."""

    min_gold_gap: float = Field(0.25, ge=0, description="pairs whose gold rewards differ less are dropped")


class DataPairs(Strict):
    """The preference pairs of the data stage."""

    source: Literal["data"]


class RewardStage(Training):
    """A scalar-head reward model trained on preference pairs with TRL's RewardTrainer."""

    _trl_config = "RewardConfig"
    model: ModelSource | None = Field(None, description="null: the SFT stage's model")
    lora: Lora | None = None
    pairs: Annotated[Union[PolicyPairs, DataPairs], Field(discriminator="source")]

    def check(self, name: str, pipeline: Pipeline) -> None:
        super().check(name, pipeline)
        stages = pipeline.stages
        if stages.sft is None and self.model is None:
            raise ValueError(f"stages.{name}.model is required when the pipeline has no sft stage")
        if isinstance(self.pairs, PolicyPairs) and stages.data.gold() is None:
            raise ValueError(
                f"stages.{name}.pairs.source 'policy' labels samples with a gold reward: set stages.data.gold_reward or use 'data'"
            )


def _given_reward_model(path: Path | None) -> dict[str, str]:
    """The digest of a reward model a stage is given instead of a reward stage's."""
    if path is None:
        return {}
    if not (path / "config.json").is_file():
        from rlhf.errors import InputError

        raise InputError(f"reward_model: {path} is not a saved model directory (no config.json)")
    from rlhf.store import digest_tree

    return {"reward_model": digest_tree(path)}


class RewardModelPairs(SampledPairs):
    """Sampled pairs ordered by the reward model's score (on-policy DPO)."""

    min_score_gap: float = Field(0.0, ge=0, description="pairs whose reward-model scores differ less are dropped")


class DpoStage(Training):
    """DPO with TRL's DPOTrainer: a LoRA policy on the SFT model (or `policy`), its reference the same model
    without the adapter, on the data stage's preference pairs or on pairs it samples and the reward model labels."""

    _trl_config = "DPOConfig"
    policy: PretrainedModel | None = Field(None, description="the starting policy when the pipeline has no sft stage")
    reward_model: Path | None = Field(
        None, description="a trained reward model that labels policy pairs when the pipeline has no reward stage"
    )
    pairs: Annotated[Union[RewardModelPairs, DataPairs], Field(discriminator="source")]
    beta: float = Field(0.1, gt=0, description="DPO's temperature: how far the policy may move from the reference")
    adapter: Adapter = LoraAdapter(type="lora")
    max_new_tokens: int = Field(40, ge=1, description="what the registered policy generates by default")

    def check(self, name: str, pipeline: Pipeline) -> None:
        super().check(name, pipeline)
        stages = pipeline.stages
        if (stages.sft is None) == (self.policy is None):
            raise ValueError(f"stages.{name}.policy: give it exactly when the pipeline has no sft stage")
        labels = isinstance(self.pairs, RewardModelPairs)
        if labels and (stages.reward is None) == (self.reward_model is None):
            raise ValueError(f"stages.{name}.reward_model: give it exactly when the pipeline has no reward stage")
        if not labels and stages.data.preferences is None:
            raise ValueError(f"stages.{name}.pairs.source 'data' needs stages.data.preferences")

    def external_inputs(self) -> dict[str, str]:
        return _given_reward_model(self.reward_model)


class KLPenalty(Strict):
    """The KL coefficient beta: fixed, or adaptive towards `target` (nats per sequence)."""

    beta: float = Field(0.05, ge=0)
    target: float | None = Field(6.0, gt=0, description="null keeps beta fixed")
    horizon: int = Field(10000, ge=1)
    estimator: Literal["k1", "k3"] = "k1"
    in_loss: bool = Field(False, description="a KL term in the loss (GRPO's way) instead of a penalty in the reward")


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
    iterations: int = Field(80, ge=1)
    batch_size: int = Field(32, ge=1, description="prompts per iteration, over all workers")
    samples_per_prompt: int = Field(1, ge=1, description="responses sampled for each prompt")
    max_prompt_tokens: int | None = Field(None, ge=1, description="prompts longer than this, rendered, are left out")
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(1.0, gt=0)
    epochs: int = Field(4, ge=1, description="epochs over each rollout batch")
    minibatches: int = Field(4, ge=1, description="optimiser steps per epoch; each minibatch spans all workers")
    learning_rate: float = Field(1e-3, gt=0, description="policy (LoRA) learning rate")
    lora: Lora = Lora()
    normalisation_samples: int = Field(
        64, ge=2, description="samples of the starting policy, under these sampling settings, that fix the score mean and std"
    )
    precision: Precision = Field(
        "fp32", description="bf16: the frozen policy and reward model held in bf16, matmuls autocast; LoRA, critic and optimizer state stay fp32"
    )
    gradient_checkpointing: bool = False
    micro_batch_size: int | None = Field(
        None, ge=1, description="sequences per forward/backward; gradients accumulate over a minibatch (null: all at once)"
    )
    kl: KLPenalty = KLPenalty()
    clip_ratio: float = Field(0.2, gt=0)
    reward_clip: float | None = Field(5.0, gt=0)
    missing_eos_penalty: float | None = Field(None, description="score given to responses that hit the length limit")
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(10, ge=1, description="iterations between Ray Train checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    samples_every: int = Field(20, ge=1, description="iterations between sample tables in MLflow")
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from")


    def check(self, name: str, pipeline: Pipeline) -> None:
        stages = pipeline.stages
        for stage, key in (("sft", "policy"), ("reward", "reward_model")):
            given = getattr(self, key) is not None
            if getattr(stages, stage) is None and not given:
                raise ValueError(f"stages.{name}.{key} is required when the pipeline has no {stage} stage")
            if getattr(stages, stage) is not None and given:
                raise ValueError(f"stages.{name}.{key}: the {stage} stage provides it; remove one of the two")
        workers = pipeline.ray.num_workers
        if self.batch_size % (workers * self.minibatches):
            raise ValueError(
                f"stages.{name}.batch_size ({self.batch_size}) must be a multiple of ray.num_workers x stages.{name}.minibatches "
                f"({workers} x {self.minibatches}): every worker takes an equal shard of each batch and splits it into "
                "equal minibatches"
            )

    def external_inputs(self) -> dict[str, str]:
        return _given_reward_model(self.reward_model)


class PpoStage(RlStage):
    """PPO: per-token rewards (the score at the end, a KL penalty at every token) and GAE advantages
    from a critic that starts as a copy of the reward model, whitened over the batch."""

    has_critic: ClassVar[bool] = True
    estimator: Literal["gae"] = "gae"
    critic_learning_rate: float = Field(1e-3, gt=0)
    critic_lora: Lora | Literal["auto"] | None = Field(
        "auto", description="null trains the critic fully; auto: LoRA r16 on a pretrained base, full on a scratch one"
    )
    clip_value: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)


class GroupStage(RlStage):
    samples_per_prompt: int = Field(4, ge=2, description="responses sampled for each prompt, compared with each other")


class GrpoStage(GroupStage):
    """GRPO (Shao et al. 2024): no critic; each response's advantage is its reward normalised within the
    responses to the same prompt; the KL to the reference is a loss term (k3)."""

    estimator: Literal["grpo"] = "grpo"
    kl: KLPenalty = KLPenalty(beta=0.04, target=None, estimator="k3", in_loss=True)


class RlooStage(GroupStage):
    """RLOO (Ahmadian et al. 2024): no critic; each response's reward, the KL penalty included, minus the
    mean reward of the other responses to the same prompt."""

    estimator: Literal["rloo"] = "rloo"


class ReinforceStage(RlStage):
    """REINFORCE++ (Hu 2025): no critic; per-token rewards as PPO's, returns-to-go whitened over the whole
    batch as advantages."""

    estimator: Literal["reinforce++"] = "reinforce++"
    gamma: float = Field(1.0, ge=0, le=1, description="discount of the per-token rewards in the returns-to-go")


RlConfig = Annotated[Union[PpoStage, GrpoStage, RlooStage, ReinforceStage], Field(discriminator="estimator")]


class HackingCheck(Strict):
    """Warn of reward hacking: the reward model's gain is large while the gold gain is small or negative."""

    min_score_gain: float = Field(1.0, description="reward-model gain (in normalised units) that counts as large")
    max_gold_gain: float = Field(0.1, description="gold gain at or below which the rise is not real")


class RegistryGates(Strict):
    """When the PPO policy is registered as `<pipeline>-policy` (alias `candidate`)."""

    min_win_rate: float = Field(0.5, ge=0, le=1, description="over the baseline; under gold when the task has one")
    max_kl: float = Field(30.0, gt=0, description="nats per sequence to the baseline (SFT or starting) policy")


class EvaluateStage(StageConfig):
    """A candidate policy against a baseline on held-out prompts, same sampling settings and seeds."""

    candidate: str | None = Field(None, description="the stage whose policy is evaluated (ppo, grpo, dpo, ...); null: the pipeline's only one besides sft")
    baseline: str | None = Field(None, description="a policy stage, or 'start': the model the candidate started from; null: sft when the pipeline has it")

    prompts: int = Field(128, ge=1, description="generations per policy, cycling through the held-out prompts")
    max_new_tokens: int = Field(40, ge=1)
    temperature: float = Field(1.0, gt=0)
    hacking: HackingCheck = HackingCheck()
    registry: RegistryGates | None = Field(RegistryGates(), description="null never registers")

    def also_reads(self) -> tuple[str, ...]:
        return (self.candidate,) + ((self.baseline,) if self.baseline != "start" else ())

    def check(self, name: str, pipeline: Pipeline) -> None:
        from rlhf.graph import GRAPH

        present = pipeline.stages.declared()
        policies = [stage for stage in present if GRAPH[stage].policy]
        if self.candidate is None:
            tuned = [stage for stage in policies if stage != "sft"]
            if len(tuned) != 1:
                raise ValueError(f"stages.{name}.candidate: name the policy to evaluate, one of: {', '.join(policies) or 'none here'}")
            self.candidate = tuned[0]
        if self.baseline is None:
            self.baseline = "sft" if "sft" in present and self.candidate != "sft" else "start"
        for key, allowed in (("candidate", policies), ("baseline", [*policies, "start"])):
            if getattr(self, key) not in allowed:
                raise ValueError(f"stages.{name}.{key}: {getattr(self, key)!r} is not one of this pipeline's policies: "
                                 f"{', '.join(allowed) or 'none'}")
        if self.candidate == self.baseline:
            raise ValueError(f"stages.{name}.baseline: the candidate ({self.candidate}) compared with itself")


class RayConfig(Strict):
    """Where PPO runs: a local cluster by default, `address` (or RAY_ADDRESS) for an existing one."""

    address: str | None = None
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: int = Field(1, ge=1, description="also the torch threads of each worker")
    use_gpu: bool = False
    wait_seconds: int = Field(
        600, ge=0, description="how long an existing (or autoscaling) cluster may take to have room for the workers"
    )

    def trains_on_ray(self) -> bool:
        """Whether training stages run as Ray Train jobs; otherwise they train in this process."""
        return self.num_workers > 1 or self.use_gpu


# -------------------------------------------------------------------- pipelines


class Tracking(Strict):
    experiment: str


class Schedule(Strict):
    """When scheduled runs start (`rlhf serve`, infra/prefect.yaml): a cron expression or an interval."""

    cron: str | None = Field(None, description="e.g. '0 3 * * *': daily at 03:00 in `timezone`")
    interval: int | None = Field(None, gt=0, description="seconds between runs")
    timezone: str = "UTC"
    overrides: list[str] = Field([], description="`--set KEY=VALUE` overrides for the scheduled runs")
    active: bool = True

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, cron: str | None) -> str | None:
        if cron is not None:
            try:
                CronSim(cron, datetime.now())
            except CronSimError as exc:
                raise ValueError(f"not a cron expression: {exc}") from None
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, timezone: str) -> str:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("not an IANA time zone such as 'UTC' or 'Europe/Berlin'") from None
        return timezone

    @model_validator(mode="after")
    def _one_kind(self) -> Schedule:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give exactly one of 'cron' and 'interval'")
        return self


class Stages(Strict):
    """`stages:`. Its fields, one per stage of the graph, are added by `schema()`."""

    def declared(self) -> list[str]:
        """The stages this pipeline has, in the graph's declaration order."""
        from rlhf.graph import GRAPH

        return [name for name in GRAPH if getattr(self, name, None) is not None]

    def present(self) -> list[str]:
        """The stages this pipeline has, in the order they run: each after every stage it reads."""
        from rlhf.graph import order

        declared = self.declared()
        return order(set(declared), {name: self._reads(name) for name in declared})

    def reads(self, stage: str) -> list[str]:
        """The stages of this pipeline whose outputs `stage` reads, in run order."""
        wanted = self._reads(stage)
        return [name for name in self.present() if name in wanted]

    def _reads(self, stage: str) -> tuple[str, ...]:
        from rlhf.graph import GRAPH

        return GRAPH[stage].reads + getattr(self, stage).also_reads()


class Pipeline(Strict):
    description: str = ""
    tracking: Tracking
    seed: int = 0
    schedule: Schedule | None = None
    ray: RayConfig = RayConfig()
    stages: Stages

    @model_validator(mode="after")
    def _stages_agree(self) -> Pipeline:
        for name in self.stages.declared():
            getattr(self.stages, name).check(name, self)
        return self

    def runs_on_ray(self, stage: str) -> bool:
        from rlhf.graph import GRAPH

        return GRAPH[stage].trains and self.ray.trains_on_ray()

    def fingerprint(self) -> str:
        """Hash of the whole resolved pipeline config, tagged on its MLflow runs."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class PipelinesFile(Strict):
    default: str
    pipelines: dict[str, Pipeline]

    @model_validator(mode="after")
    def _default_exists(self) -> PipelinesFile:
        if self.default not in self.pipelines:
            raise ValueError(f"default pipeline {self.default!r} is not defined")
        return self


@functools.cache
def schema() -> type[PipelinesFile]:
    """The model of `pipelines.yaml`: `stages:` takes one optional block per stage of the graph."""
    from rlhf.graph import GRAPH

    blocks = {name: (stage.config, ...) if stage.required else (Optional[stage.config], None) for name, stage in GRAPH.items()}
    stages = create_model("Stages", __base__=Stages, **blocks)
    pipeline = create_model("Pipeline", __base__=Pipeline, stages=(stages, ...))
    return create_model("PipelinesFile", __base__=PipelinesFile, pipelines=(dict[str, pipeline], ...))


# ---------------------------------------------------------------------- loading


def _strip(annotation: Any) -> Any:
    """Annotated[X] -> X and Optional[X] -> X."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, UnionType) and type(None) in get_args(annotation):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            annotation = rest[0] if len(rest) == 1 else Union[tuple(rest)]
        else:
            return annotation


def _tagged(model: type[BaseModel], tag: Any) -> bool:
    """Whether `tag` is the discriminator value of `model` in a tagged union."""
    return any(get_origin(f.annotation) is Literal and tag in get_args(f.annotation) for f in model.model_fields.values())


def _walk(loc: tuple) -> tuple[list[str], Any]:
    """Follow an error location through the schema.

    Returns the dotted key as the user wrote it (discriminated-union tags that
    pydantic inserts into locations are dropped) and the model at its end.
    """
    node: Any = schema()
    shown: list[str] = []
    for part in loc:
        node = _strip(node)
        origin = get_origin(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            shown.append(str(part))
            field = node.model_fields.get(part)
            node = field.annotation if field else None
        elif origin is dict:
            shown.append(str(part))
            node = get_args(node)[1]
        elif origin in (Union, UnionType):
            node = next((m for m in get_args(node) if _tagged(m, part)), None)
        else:
            shown.append(str(part))
            node = None
    return shown, _strip(node)


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    shown, _ = _walk(tuple(first["loc"]))
    path = ".".join(shown)
    if first["type"] == "extra_forbidden":
        _, parent = _walk(tuple(first["loc"])[:-1])
        allowed = sorted(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        return f"{where}: unknown key '{path}'; allowed keys here: {', '.join(allowed)}"
    value = first.get("input")
    shown_value = "" if isinstance(value, dict) else f" (got {_shorten(value)})"
    return f"{where}: '{path}': {first['msg']}{shown_value}"


def _shorten(value: Any, limit: int = 80) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[: limit - 5]}...{shown[-2:]}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`stages.ppo.iterations=10` -> (['stages','ppo','iterations'], 10)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"--set {_shorten(text)}: expected KEY=VALUE, e.g. stages.data.eval_fraction=0.1")
    if not key.isprintable():
        raise InputError(f"--set {_shorten(key)}: a key is printable text, e.g. stages.data.eval_fraction")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).replace("\n", " ")
        raise InputError(f"--set {key}: value {_shorten(raw)} is not valid YAML: {why}") from None
    return key.split("."), value


def apply_overrides(raw: dict, pipeline: str, overrides: list[str]) -> dict:
    """Apply `--set` overrides to one pipeline's raw mapping (keys relative to the pipeline)."""
    if overrides:  # a block shared with other pipelines through a YAML alias changes for this one only
        raw["pipelines"][pipeline] = copy.deepcopy(raw["pipelines"][pipeline])
    for text in overrides:
        keys, value = parse_override(text)
        node = raw["pipelines"][pipeline]
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                dotted = ".".join(keys[: depth + 1])
                raise InputError(f"--set {'.'.join(keys)}: '{dotted}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _load_yaml(text: str) -> Any:
    # libyaml's parser refuses deep nesting at once; the pure-Python one recurses until RecursionError, slowly
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def read_yaml(path: Path) -> dict:
    try:
        raw = _load_yaml(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    except RecursionError:
        raise InputError(f"{path}: not usable YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping with 'default' and 'pipelines'")
    return raw


def _resolve_paths(pipeline: Pipeline, base: Path) -> None:
    """Relative data paths are relative to the directory of the config file."""
    stages = pipeline.stages
    for source in (stages.data.instructions, stages.data.preferences, stages.data.prompts):
        if isinstance(source, FileSource) and not source.path.is_absolute():
            source.path = (base / source.path).resolve()
    if stages.ppo is not None and stages.ppo.reward_model is not None and not stages.ppo.reward_model.is_absolute():
        stages.ppo.reward_model = (base / stages.ppo.reward_model).resolve()


def load_file(path: Path) -> PipelinesFile:
    raw = read_yaml(path)
    try:
        parsed = schema().model_validate(raw)
    except ValidationError as err:
        raise InputError(_format_validation_error(err, str(path))) from None
    for name, pipeline in parsed.pipelines.items():
        _resolve_paths(pipeline, path.parent)
        if pipeline.schedule:  # the scheduled runs' overrides must give a valid pipeline too
            try:
                load_pipeline(path, name, pipeline.schedule.overrides)
            except InputError as exc:
                raise InputError(f"pipelines.{name}.schedule.overrides: {exc}") from None
    return parsed


def load_pipeline(path: Path, name: str | None, overrides: list[str] = ()) -> tuple[str, Pipeline]:
    """Load one pipeline with overrides applied; validates the whole file first."""
    raw = read_yaml(path)
    name = name or raw.get("default")
    if name not in (raw.get("pipelines") or {}):
        known = ", ".join(sorted(raw.get("pipelines") or {}))
        raise InputError(f"{path}: no pipeline named {name!r}; defined: {known}")
    raw = apply_overrides(raw, name, list(overrides))
    try:
        parsed = schema().model_validate(raw)
    except ValidationError as err:
        raise InputError(_format_validation_error(err, str(path))) from None
    pipeline = parsed.pipelines[name]
    _resolve_paths(pipeline, path.parent)
    return name, pipeline


def plan(stages: list[str], from_stage: str | None, only: str | None) -> dict[str, str]:
    """stage -> 'auto' (reuse if complete), 'force' (run again) or 'require' (must be complete).

    `--only S` runs S alone (reused when complete, like any stage); `--from S --only S` forces it.
    """
    for option, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in stages:
            raise InputError(f"{option} {value}: no such stage in this pipeline; stages: {', '.join(stages)}")
    if only:
        if from_stage not in (None, only):
            raise InputError(f"--from {from_stage} --only {only}: together they must name the same stage")
        return {stage: "require" for stage in stages[: stages.index(only)]} | {only: "force" if from_stage else "auto"}
    forced_from = stages.index(from_stage) if from_stage else len(stages)
    return {stage: "force" if i >= forced_from else "auto" for i, stage in enumerate(stages)}
