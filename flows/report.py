"""The pipeline run's parent MLflow run (`report.md` as its description, headline metrics) and the evaluation lines of the CLI summary."""

from __future__ import annotations

import json
import time

from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from rlhf.graph import GRAPH
from rlhf.lifecycle import StageRecord


def _evaluation(records: list[StageRecord]) -> dict:
    found = [r for r in records if "evaluation" in GRAPH[r.stage].provides]
    return json.loads((found[0].outputs / "evaluation.json").read_text()) if found else {}


def headline_metrics(records: list[StageRecord]) -> dict[str, float]:
    """What the parent run carries, so the runs table compares pipeline runs: each stage's headline and
    seconds (in this run: a reused stage takes about none), and the evaluation's gains, win rates and KL."""
    metrics = {f"{r.stage}.seconds": r.seconds for r in records}
    metrics |= {f"{r.stage}.{r.headline[0]}": r.headline[1] for r in records if r.headline}
    evaluation = _evaluation(records).get("metrics", {})
    shown = ("gold_gain", "win_rate_gold", "score_gain", "win_rate_score", "kl_to_baseline")
    return metrics | {f"evaluate.{name}": evaluation[name] for name in shown if name in evaluation}


def evaluation_lines(records: list[StageRecord], pipeline: str) -> list[str]:
    """Win rate, gold delta, KL, hacking warning and registered version, when the run evaluated."""
    found = _evaluation(records)
    if not found:
        return []
    m, candidate, baseline = found["metrics"], found["candidate"].upper(), found["baseline"].upper()
    lines = []
    if "gold_gain" in m:
        lines.append(
            f"gold reward: {baseline} {m['baseline.gold_mean']:+.3f} -> {candidate} {m['candidate.gold_mean']:+.3f} "
            f"(gain {m['gold_gain']:+.3f}, {candidate} wins {m['win_rate_gold']:.0%} under gold)"
        )
    lines.append(
        f"reward model: gain {m['score_gain']:+.3f} ({baseline} std units), {candidate} wins {m['win_rate_score']:.0%}; "
        f"KL to {baseline} {m['kl_to_baseline']:.2f} nats/response over {int(m['prompts'])} held-out generations"
    )
    if m["reward_hacking"]:
        lines.append("WARNING: possible reward hacking: the reward model's gain is large but the gold gain is not")
    version = int(m["registered_version"])
    lines.append(
        f"registered: {pipeline}-policy version {version} (alias candidate)" if version else "not registered (gates not met)"
    )
    return lines


def log_report(parent_run: str, pipeline: str, tags: dict[str, str], records: list[StageRecord]) -> None:
    rows = "\n".join(
        f"| {r.stage} | {r.action} | {r.headline[0] + ' = ' + format(r.headline[1], '.4g') if r.headline else ''} "
        f"| {r.seconds:.1f} | `{r.run_id}`"
        + (f" (made by `{r.source_run_id}`)" if r.source_run_id != r.run_id else "")
        + " |"
        for r in records
    )
    evaluation = "\n".join(f"- {line}" for line in evaluation_lines(records, pipeline))
    text = (
        f"# Pipeline `{pipeline}`\n\n"
        f"config hash `{tags['rlhf.config_hash']}`, git commit `{tags['rlhf.git_commit']}`, "
        f"Prefect flow run `{tags['rlhf.prefect_flow_run_id']}`, stages: {tags['rlhf.selection']}\n\n"
        "| stage | action | headline | seconds | MLflow run |\n|---|---|---|---|---|\n"
        f"{rows}\n"
        + (f"\n## Evaluation\n\n{evaluation}\n" if evaluation else "")
    )
    client = MlflowClient()
    client.log_text(parent_run, text, "report.md")
    client.set_tag(parent_run, MLFLOW_RUN_NOTE, text)  # the run's description on the dashboard
    now = int(time.time() * 1000)
    client.log_batch(parent_run, metrics=[Metric(name, value, now, 0) for name, value in headline_metrics(records).items()])
