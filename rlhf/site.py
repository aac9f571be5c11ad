"""Where a pipeline runs: what its stages read beyond their config and the stage graph.

That is the home (earlier runs of the pipeline) and the label store, whose
queue for the pipeline is named after it. Judgements arrive there between
runs with no change of config, so the stages that read them take their digest
into their fingerprint (`live_inputs`), and may wait for more (`waiting`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from rlhf import registry, tracking
from rlhf.errors import InputError
from rlhf.labels.store import LabelStore, store_url
from rlhf.pipeline import Labels
from rlhf.store import StageDir


@dataclass(frozen=True)
class Site:
    home: Path
    pipeline: str
    labels: Labels

    @property
    def queue(self) -> str:
        return self.pipeline

    @property
    def labels_url(self) -> str:
        return store_url(self.home, self.labels.url)

    def store(self) -> LabelStore:
        return _open(self.labels_url)

    def newest(self, stage: str | None) -> dict | None:
        """The manifest of the newest complete result of `stage` in this pipeline, whatever its fingerprint: the
        current reward model of a loop that retrains it as judgements arrive."""
        if stage is None:
            return None
        found = [m for d in sorted((self.home / "runs" / self.pipeline / stage).glob("*")) if d.is_dir() and (m := StageDir(d).manifest())]
        return max(found, key=lambda m: m["finished_at"], default=None)

    def registered_version(self, model_uri: str) -> str:
        """`models:/NAME@ALIAS` -> the version it points at now, from this home's tracking store."""
        tracking.configure(self.home)
        try:
            return registry.version_of(model_uri)
        except LookupError as exc:
            raise InputError(f"{model_uri}: {exc}") from None


@functools.cache
def _open(url: str) -> LabelStore:
    """One store per URL and process: opening one migrates it, and its connection pool is shared."""
    return LabelStore(url)
