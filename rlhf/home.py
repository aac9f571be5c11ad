"""The home directory (`--home`, `RLHF_HOME`, default `./.rlhf`) and the environment it implies."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve(home: str | Path | None) -> Path:
    return Path(home or os.environ.get("RLHF_HOME") or ".rlhf").expanduser().resolve()


def default_config() -> Path:
    """`./pipelines.yaml` when there is one, else the project's own (in a clone, or an editable install)."""
    for candidate in (Path("pipelines.yaml"), PROJECT_ROOT / "pipelines.yaml"):
        if candidate.exists():
            return candidate
    raise InputError(
        f"no pipelines.yaml in the working directory ({Path.cwd()}) or in the project ({PROJECT_ROOT}); "
        "give one with --config FILE"
    )


def prepare(home: Path) -> None:
    """Point Prefect at the home, then the stages; must run before Prefect is imported."""
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "rlhf")
    prepare_stages(home)


def prepare_stages(home: Path) -> None:
    """The environment the stages (Ray, datasets, the hub client) need; also for runs a Prefect worker starts."""
    home.mkdir(parents=True, exist_ok=True)
    os.environ["RLHF_HOME"] = str(home)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_DATASETS_CACHE", str(home / "cache" / "datasets"))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # per-map bars drown the progress lines
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model logged
