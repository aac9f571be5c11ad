"""The stage graph: every stage a pipeline can have, declared once.

A stage is its name, its typed block under `stages:`, the stages whose
outputs it reads, its recipe (a Prefect task in `tasks/`), whether it trains
on Ray, and whether it makes a policy that `evaluate` can compare. The
schema of `stages:`, the order stages run in, their fingerprint inputs and
the flow's tasks all derive from this table; a new stage is a recipe, a
`declare(...)` and its block in `pipelines.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config import (
    DataStage,
    DpoStage,
    EvaluateStage,
    GrpoStage,
    PpoStage,
    ReinforceStage,
    RewardStage,
    RlooStage,
    SftStage,
    StageConfig,
)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[StageConfig]
    reads: tuple[str, ...]  # upstream stages whose outputs it reads, when the pipeline has them
    task: str  # `module:function` of its Prefect task, e.g. `tasks.sft:sft`
    trains: bool = False  # on Ray Train when the `ray` block asks for >1 worker or a GPU, else in this process
    policy: bool = False  # makes a policy: `model/` and `mlflow_model.json` in its outputs
    required: bool = False


GRAPH: dict[str, Stage] = {}


def declare(*stages: Stage) -> None:
    """Add stages to the graph (a plug-in or a test may add its own); the schema of `stages:` follows."""
    for stage in stages:
        unknown = [name for name in stage.reads if name not in GRAPH]
        if unknown:
            raise ValueError(f"stage {stage.name!r} reads undeclared stages {unknown}")
        GRAPH[stage.name] = stage
    from rlhf import config

    config.schema.cache_clear()


def order(present: set[str], reads: dict[str, tuple[str, ...]]) -> list[str]:
    """The present stages, each after every stage it reads; otherwise in declaration order."""
    ordered: list[str] = []
    while len(ordered) < len(present):
        ready = [name for name in GRAPH if name in present and name not in ordered
                 and all(r in ordered for r in reads[name] if r in present)]
        if not ready:
            raise ValueError(f"stages read each other in a cycle: {sorted(present - set(ordered))}")
        ordered.append(ready[0])
    return ordered


def policy_stages() -> list[str]:
    return [name for name, stage in GRAPH.items() if stage.policy]


declare(
    Stage("data", DataStage, reads=(), task="tasks.data_prep:data_prep", required=True),
    Stage("sft", SftStage, reads=("data",), task="tasks.sft:sft", trains=True, policy=True),
    Stage("reward", RewardStage, reads=("data", "sft"), task="tasks.reward:reward", trains=True),
    *(Stage(name, config, reads=("data", "sft", "reward"), task="tasks.rl:rl", trains=True, policy=True)
      for name, config in (("ppo", PpoStage), ("grpo", GrpoStage), ("rloo", RlooStage), ("reinforce", ReinforceStage))),
    Stage("dpo", DpoStage, reads=("data", "sft", "reward"), task="tasks.dpo:dpo", trains=True, policy=True),
    Stage("evaluate", EvaluateStage, reads=("data", "sft", "reward"), task="tasks.evaluate:evaluate"),
)
