"""The artifact store: `runs/<pipeline>/<stage>/<fingerprint>/` under the home.

A stage directory holds `outputs/` (what downstream stages read), `work/`
(checkpoints and the MLflow run id of an attempt in progress) and, once the
stage is complete, `manifest.json`. The manifest is written last and
atomically, so a directory without one is never mistaken for a result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger("rlhf")

MANIFEST = "manifest.json"


def digest_tree(path: Path) -> str:
    """Content digest of a file or directory: relative names and bytes, in sorted order."""
    hasher = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        hasher.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
        hasher.update(b"\0")
    return hasher.hexdigest()


def fingerprint(stage: str, config: dict, seed: int, inputs: dict[str, str]) -> str:
    """Hash of what determines a stage's outputs: its config, the seed and its input digests."""
    text = json.dumps({"stage": stage, "config": config, "seed": seed, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@dataclass(frozen=True)
class StageDir:
    root: Path

    @classmethod
    def of(cls, home: Path, pipeline: str, stage: str, fingerprint: str) -> StageDir:
        return cls(home / "runs" / pipeline / stage / fingerprint)

    def twins(self) -> list[StageDir]:
        """The same stage and fingerprint under the home's other pipelines: the same result, if complete."""
        stage, fingerprint = self.root.parent.name, self.root.name
        runs = self.root.parents[2]
        return [StageDir(d) for d in sorted(runs.glob(f"*/{stage}/{fingerprint}")) if d != self.root and d.is_dir()]

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def manifest(self) -> dict | None:
        """The manifest of a complete stage; None when there is none, or when it is damaged (the stage runs again)."""
        path = self.root / MANIFEST
        try:
            manifest = json.loads(path.read_text())
            manifest["outputs"]["digest"], manifest["metrics"], manifest["mlflow_run_id"]  # noqa: B018
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s is damaged (%s: %s): the stage counts as not run", path, type(exc).__name__, exc)
            return None
        return manifest

    def lock(self) -> FileLock:
        """One writer per stage directory; the lock file sits beside it so it survives cleanup."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root) + ".lock")

    def is_busy(self) -> bool:
        lock = self.lock()
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def new_outputs(self) -> Path:
        """Where an attempt writes; promoted to `outputs/` only when the attempt succeeds."""
        path = self.work / "outputs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def complete(self, manifest: dict) -> None:
        """Promote the attempt's outputs, write the manifest last, then drop the work dir."""
        staged = self.work / "outputs"
        if self.outputs.exists():  # a forced rerun replaces what it recomputed
            self.outputs.rename(self.work / "replaced")
        staged.rename(self.outputs)
        write_json_atomic(self.root / MANIFEST, manifest)
        shutil.rmtree(self.work, ignore_errors=True)
