"""The stage graph: every stage a pipeline can have, declared once.

A stage is its name, its typed block under `stages:`, its recipe, what it
needs (data, a policy, a reward model) and what it provides, and whether it
trains (here or on Ray Train). Each need is met by the stage of the pipeline
that provides it; no code outside a stage's own room asks for another stage
by name. The schema of `stages:`, the order stages run in, their fingerprint
inputs and the flow's tasks all derive from this table; a new stage is a
room (`rlhf/stages/<name>/`: its block and its recipe), a `declare(...)` and
its block in `pipelines.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.blocks import StageConfig
from rlhf.stages.data.config import DataStage
from rlhf.stages.dpo.config import DpoStage
from rlhf.stages.evaluate.config import EvaluateStage
from rlhf.stages.propose.config import ProposeStage
from rlhf.stages.reward.config import RewardStage
from rlhf.stages.rl.config import METHODS
from rlhf.stages.sft.config import SftStage


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[StageConfig]
    recipe: str  # `module:function` of its recipe, imported only when the stage runs, e.g. `rlhf.stages.sft.recipe:train_sft`
    needs: tuple[str, ...] = ()  # what it reads from the stages of the pipeline that provide it, when there are any
    provides: tuple[str, ...] = ()  # data, policy, judgements, reward_model, evaluation
    trains: bool = False  # on Ray Train when the `ray` block asks for >1 worker or a GPU, else in this process
    required: bool = False


GRAPH: dict[str, Stage] = {}


def declare(*stages: Stage) -> None:
    """Add stages to the graph (a plug-in or a test may add its own); the schema of `stages:` follows."""
    for stage in stages:
        GRAPH[stage.name] = stage


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


def providers(present: list[str], stage: str) -> dict[str, str]:
    """What `stage` needs -> the present stage that gives it: one that provides it without needing it itself,
    so a tuned policy is tuned from the policy that starts the pipeline (sft), never from another tuned one."""
    found = {}
    for need in GRAPH[stage].needs:
        given = [name for name in present if name != stage and need in GRAPH[name].provides and need not in GRAPH[name].needs]
        if given:
            found[need] = given[0]
    return found


declare(
    Stage("data", DataStage, "rlhf.stages.data.recipe:prepare_data", provides=("data",), required=True),
    Stage("sft", SftStage, "rlhf.stages.sft.recipe:train_sft", needs=("data",), provides=("policy",), trains=True),
    Stage("propose", ProposeStage, "rlhf.stages.propose.recipe:propose_pairs", needs=("data", "policy"), provides=("judgements",)),
    Stage("reward", RewardStage, "rlhf.stages.reward.recipe:train_reward", needs=("data", "policy", "judgements"),
          provides=("reward_model",), trains=True),
    *(Stage(name, config, "rlhf.stages.rl.recipe:train_rl", needs=("data", "policy", "reward_model"), provides=("policy",),
            trains=True)
      for name, config in METHODS.items()),
    Stage("dpo", DpoStage, "rlhf.stages.dpo.recipe:train_dpo", needs=("data", "policy", "judgements", "reward_model"),
          provides=("policy",), trains=True),
    Stage("evaluate", EvaluateStage, "rlhf.stages.evaluate.recipe:evaluate_policies", needs=("data", "policy", "reward_model"),
          provides=("evaluation",)),
)
