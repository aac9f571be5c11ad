"""The schema of `pipelines.yaml`: pipelines, their schedule, tracking and `ray` block, and `stages:`, whose
blocks are those of the stage graph (`rlhf/graph.py`).

Every model forbids unknown keys, so a typo is an error that names its dotted
path and the keys allowed there instead of a silently ignored setting.
"""

from __future__ import annotations

import functools
import hashlib
import json
from datetime import datetime
from typing import Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import Field, create_model, field_validator, model_validator

from rlhf.blocks import PretrainedModel, StageConfig, Strict
from rlhf.cluster import RayConfig
from rlhf.graph import GRAPH, Stage, order, providers


class Tracking(Strict):
    experiment: str = Field(description="the MLflow experiment of the pipeline's runs")


class Schedule(Strict):
    """When scheduled runs start (`rlhf serve`, infra/prefect.yaml): a cron expression or an interval."""

    cron: str | None = Field(None, description="e.g. '0 3 * * *': daily at 03:00 in `timezone`")
    interval: int | None = Field(None, gt=0, description="seconds between runs")
    timezone: str = Field("UTC", description="the IANA time zone of `cron`, e.g. Europe/Berlin")
    overrides: list[str] = Field([], description="`--set KEY=VALUE` overrides for the scheduled runs")
    active: bool = Field(True, description="false registers the schedule paused")
    min_new_labels: int | None = Field(
        None, ge=1, description="a scheduled run trains only when this many judgements arrived since the last completed run; "
        "otherwise it ends at once (needs a stage that reads judgements: pairs.source labels)",
    )

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


class Labels(Strict):
    """The label store, where people's judgements of the pipeline's pairs are kept (`rlhf label` serves its page);
    the pipeline's items are its queue, named after the pipeline."""

    url: str | None = Field(
        None, description="a SQLAlchemy URL, e.g. postgresql+psycopg://user@host/labels; null: RLHF_LABELS_URL, else SQLite under the home"
    )
    page: str = Field("http://127.0.0.1:8765/", description="where annotators judge (`rlhf label`), named when a run waits for judgements")


class Stages(Strict):
    """`stages:`. Its fields, one per stage of the graph, are added by `schema()`."""

    def declared(self) -> list[str]:
        """The stages this pipeline has, in the graph's declaration order."""
        return [name for name in GRAPH if getattr(self, name, None) is not None]

    def block(self, stage: str) -> StageConfig:
        return getattr(self, stage)

    def present(self) -> list[str]:
        """The stages this pipeline has, in the order they run: each after every stage it reads."""
        declared = self.declared()
        return order(set(declared), {name: self._reads(name) for name in declared})

    def providers(self, stage: str) -> dict[str, str]:
        """What `stage` needs (data, policy, reward_model) -> the stage of this pipeline that provides it."""
        return providers(self.declared(), stage)

    def provider(self, need: str, stage: str) -> str | None:
        return self.providers(stage).get(need)

    def pretrained(self, stage: str) -> bool:
        """Whether the model `stage` trains descends from a pretrained one, through the stages that provide its policy."""
        own = self.block(stage).own_model()
        if own is not None:
            return isinstance(own, PretrainedModel)
        provider = self.provider("policy", stage)
        return provider is not None and self.pretrained(provider)

    def given(self, need: str, stage: str) -> StageConfig | None:
        """The block of the stage that provides `need` to `stage`."""
        provider = self.provider(need, stage)
        return None if provider is None else self.block(provider)

    def providing(self, kind: str) -> list[str]:
        return [name for name in self.declared() if kind in GRAPH[name].provides]

    def tuned(self) -> list[str]:
        """The policies this pipeline tunes from another policy (ppo, dpo, ...)."""
        return [name for name in self.providing("policy") if "policy" in GRAPH[name].needs]

    def judged(self) -> list[str]:
        """The stages that train on people's judgements from the label store."""
        return [name for name in self.declared() if self.block(name).reads_judgements()]

    def reads(self, stage: str) -> list[str]:
        """The stages of this pipeline whose outputs `stage` reads, in run order."""
        wanted = self._reads(stage)
        return [name for name in self.present() if name in wanted]

    def _reads(self, stage: str) -> tuple[str, ...]:
        return tuple(self.providers(stage).values()) + self.block(stage).also_reads()


class Pipeline(Strict):
    description: str = Field("", description="what the pipeline is for, shown by `rlhf list` and on its scheduled deployment")
    tracking: Tracking = Field(description="where its runs are tracked in MLflow")
    seed: int = Field(0, description="the seed of every stage: same seed and config, same numbers")
    schedule: Schedule | None = Field(None, description="scheduled runs served by `rlhf serve` (needs a Prefect server); null: none")
    ray: RayConfig = Field(RayConfig(), description="where the training stages run")
    labels: Labels = Field(Labels(), description="the label store of people's judgements (`rlhf label`)")
    stages: Stages = Field(description="the pipeline's stages, one block each; data is required")

    @model_validator(mode="after")
    def _stages_agree(self) -> Pipeline:
        for name in self.stages.declared():
            getattr(self.stages, name).check(name, self)
        if self.schedule and self.schedule.min_new_labels and not self.stages.judged():
            raise ValueError("schedule.min_new_labels: no stage of this pipeline reads judgements (pairs: {source: labels})")
        return self

    def runs_on_ray(self, stage: str) -> bool:
        return GRAPH[stage].trains and self.ray.trains_on_ray()

    def fingerprint(self) -> str:
        """Hash of the whole resolved pipeline config, tagged on its MLflow runs."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class PipelinesFile(Strict):
    default: str = Field(description="the pipeline `rlhf run` runs when given none")
    pipelines: dict[str, Pipeline] = Field(description="pipelines by name")

    @model_validator(mode="after")
    def _default_exists(self) -> PipelinesFile:
        if self.default not in self.pipelines:
            raise ValueError(f"default pipeline {self.default!r} is not defined")
        return self


def schema() -> type[PipelinesFile]:
    """The model of `pipelines.yaml`: `stages:` takes one optional block per stage of the graph (as it is now:
    a plug-in may declare more)."""
    return _schema(tuple(GRAPH.values()))


@functools.cache
def _schema(graph: tuple[Stage, ...]) -> type[PipelinesFile]:
    blocks = {stage.name: (stage.config if stage.required else Optional[stage.config], Field(... if stage.required else None,
                                                                                             description=_summary(stage)))
              for stage in graph}
    stages = create_model("Stages", __base__=Stages, **blocks)
    pipeline = create_model("Pipeline", __base__=Pipeline, stages=(stages, Pipeline.model_fields["stages"]))
    return create_model("PipelinesFile", __base__=PipelinesFile, pipelines=(dict[str, pipeline], PipelinesFile.model_fields["pipelines"]))


def _summary(stage: Stage) -> str:
    """A stage block's description: the first paragraph of its docstring."""
    return " ".join((stage.config.__doc__ or stage.name).split("\n\n")[0].split())
