"""The home directory (`--home`, `RLHF_HOME`, default `./.rlhf`) and the environment it implies."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf.errors import InputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve(home: str | Path | None, option: str = "--home") -> Path:
    """The home, absolute; `option` (how the user gave it) names it in the InputError when it cannot be one."""
    if not home and os.environ.get("RLHF_HOME"):
        option = "RLHF_HOME"
    given = home or os.environ.get("RLHF_HOME") or ".rlhf"
    try:
        path = Path(given).expanduser().resolve()
        # a file where the home or a folder above it should be: every command would end in a traceback later
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    except (OSError, RuntimeError) as exc:  # ~nosuchuser, a symlink loop, a name too long
        raise InputError(f"{option} {given}: {exc}") from None
    if blocking is not None:
        raise InputError(f"{option} {given}: {blocking} is a file, not a directory")
    return path


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
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only, or another user's
        raise InputError(f"home {home} (--home, RLHF_HOME): cannot create it: {exc.strerror or exc}") from None
    os.environ["RLHF_HOME"] = str(home)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_DATASETS_CACHE", str(home / "cache" / "datasets"))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # per-map bars drown the progress lines
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model logged
