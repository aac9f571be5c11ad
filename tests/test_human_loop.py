"""People in the loop at test scale, through the real flow, page and store: the propose stage queues pairs, a run
waits for judgements, annotators (simulated, through the page's HTTP API) judge them, the reward model and RL
train on them and train again exactly when new ones arrive, a scheduled run on a real Prefect server waits for
`schedule.min_new_labels`, and `rlhf promote` waits for people's verdict on the candidate."""

import json
import sqlite3
from pathlib import Path

import mlflow
import pytest

from conftest import HH_FILE, TINY_PIPELINES, Cli, PrefectApi, kill_group, prefect_api
from rlhf.labels.store import LabelStore, NewItem
from rlhf.synthetic_reviews import generate_examples

pytestmark = pytest.mark.slow
PIPELINE = "tiny-human"


def complete(home: Path, stage: str) -> list[Path]:
    """The stage's complete results (one per fingerprint)."""
    return sorted(d for d in (home / "runs" / PIPELINE / stage).glob("*") if (d / "manifest.json").exists())


def counts(home: Path) -> dict[str, int]:
    return {stage: len(complete(home, stage)) for stage in ("data", "sft", "propose", "reward", "ppo", "evaluate")}


def store(home: Path) -> LabelStore:
    return LabelStore(f"sqlite:///{home}/labels.db")


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    project = tmp_path_factory.mktemp("human-project")
    (project / "pipelines.yaml").write_text(TINY_PIPELINES.replace("HH_FILE", str(HH_FILE)))
    (project / "prefs.jsonl").write_text("")
    cli = Cli(project, project / "home")
    first = cli("run", PIPELINE, timeout=900)
    return cli, first


def test_a_run_queues_pairs_then_waits_for_judgements_without_error(loop):
    cli, first = loop
    assert first.returncode == 0, first.stderr[-3000:]
    assert "waiting for judgements: 0 of 12 pairs judged; judge them at http://127.0.0.1:8765/" in first.stdout
    assert counts(cli.home) == {"data": 1, "sft": 1, "propose": 1, "reward": 0, "ppo": 0, "evaluate": 0}
    stats = store(cli.home).stats(PIPELINE)["queue"]
    assert (stats["items"], stats["gold_items"], stats["judgements"]) == (56, 4, 0)
    status = cli("status", PIPELINE)
    assert "waiting for judgements" in status.stdout and "waits for reward" in status.stdout


def test_judgements_through_the_page_train_reward_and_rl_and_only_new_ones_train_again(loop):
    cli, _ = loop
    judged = cli("label", "simulate", PIPELINE, "--annotators", "2", "--judgements", "1000", "--temperature", "0.05")
    assert judged.returncode == 0, judged.stderr[-3000:]
    trained = cli("run", PIPELINE, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "waiting" not in trained.stdout
    assert counts(cli.home) == {"data": 1, "sft": 1, "propose": 1, "reward": 1, "ppo": 1, "evaluate": 1}
    [reward] = complete(cli.home, "reward")
    manifest = (reward / "manifest.json").read_text()
    pairs, _ = store(cli.home).preference_pairs(PIPELINE)
    assert f'"judged.pairs": {float(len(pairs))}' in manifest
    assert "judgements:tiny-human" in manifest  # the judgements are an input of its fingerprint

    again = cli("run", PIPELINE, timeout=600)
    assert again.returncode == 0 and counts(cli.home)["reward"] == 1  # nothing new: everything reused

    labels = store(cli.home)  # one more judgement of a pair people brought
    annotator = labels.authenticate(labels.add_annotator("late"))
    labels.add_items(PIPELINE, "late", [NewItem([{"role": "user", "content": "Write a review of the lamp."}], "A great lamp.", "A bad lamp.", {}, {})])
    skipped = []
    while (item := labels.next_item(annotator.id, PIPELINE, gold_rate=0.0, exclude=skipped)).purpose != "train":
        skipped.append(item.id)  # the evaluation's candidate-against-baseline pairs: left for the promotion test
    labels.judge(annotator.id, item.id, "A")
    retrained = cli("run", PIPELINE, timeout=900)
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    assert counts(cli.home) == {"data": 1, "sft": 1, "propose": 1, "reward": 2, "ppo": 2, "evaluate": 2}


def test_promotion_waits_for_people_to_prefer_the_candidate(loop):
    cli, _ = loop
    refused = cli("promote", PIPELINE, "1")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "error: promote tiny-human 1: people judged it against its baseline 0 times (no win rate yet")
    assert "the gate needs 6 judgements and a win rate of 0.60" in refused.stderr

    labels = store(cli.home)
    judge = labels.authenticate(labels.add_annotator("owner", owner=True))
    with sqlite3.connect(cli.home / "labels.db") as db:  # which side is the candidate: never shown to annotators
        sides = {item: (json.loads(a)["version"], json.loads(b)["version"])
                 for item, a, b in db.execute("SELECT id, policy_a, policy_b FROM items WHERE purpose = 'gate'")}
    candidate_side = {item: "A" if a == 1 else "B" for item, (a, b) in sides.items() if 1 in (a, b)}
    assert len(candidate_side) == 8  # human_pairs, for the registered version 1 (and as many for version 2)
    while (item := labels.next_item(judge.id, PIPELINE, gold_rate=0.0)) is not None:
        labels.judge(judge.id, item.id, candidate_side.get(item.id, "tie"))  # people prefer the candidate every time
    promoted = cli("promote", PIPELINE, "1")
    assert promoted.returncode == 0, promoted.stderr
    assert "win rate 1.00" in promoted.stdout and "version 1 is now 'champion'" in promoted.stdout
    tracked = mlflow.MlflowClient(f"sqlite:///{cli.home}/mlflow.db")
    runs = tracked.search_runs([e.experiment_id for e in tracked.search_experiments()], "metrics.`evaluate.human_win_rate` = 1")
    assert sorted(str(r.data.tags.get("rlhf.stage")) for r in runs) == ["None", "evaluate"]  # the evaluation's run and its pipeline's


def test_the_champion_proposes_the_next_pairs(loop):
    """The loop's next round asks people about the policy that ships: the registered champion."""
    cli, _ = loop
    with sqlite3.connect(cli.home / "labels.db") as db:
        [(newest,)] = db.execute("SELECT max(id) FROM items")
    proposed = cli("run", PIPELINE, "--only", "propose", "--set", "stages.propose.policy=models:/tiny-human-policy@champion", timeout=600)
    assert proposed.returncode == 0, proposed.stderr[-3000:]
    with sqlite3.connect(cli.home / "labels.db") as db:
        made_by = [json.loads(policy) for (policy,) in db.execute("SELECT policy_a FROM items WHERE id > ?", (newest,))]
    assert len(made_by) == 40 + 12 + 4  # count, eval_count, gold_checks
    assert all(m == {"model": "models:/tiny-human-policy@champion", "version": "1"} for m in made_by)



def test_uncertain_asks_about_the_pairs_the_newest_reward_model_scores_closest(loop):
    cli, _ = loop
    proposed = cli("run", PIPELINE, "--only", "propose", "--set", "stages.propose.select=uncertain",
                   "--set", "stages.propose.count=10", "--set", "stages.propose.eval_count=2", timeout=600)
    assert proposed.returncode == 0, proposed.stderr[-3000:]
    [manifest] = [m for m in map(lambda d: json.loads((d / "manifest.json").read_text()), complete(cli.home, "propose"))
                  if m["config"]["select"] == "uncertain"]
    newest_reward = max((json.loads((d / "manifest.json").read_text()) for d in complete(cli.home, "reward")), key=lambda m: m["finished_at"])
    assert manifest["inputs"]["reward_model"] == newest_reward["outputs"]["digest"]
    assert manifest["metrics"]["score_gap_kept"] < manifest["metrics"]["score_gap_sampled"] / 2  # the closest of 4 per pair kept

def test_a_scheduled_run_trains_only_once_min_new_labels_judgements_arrived(loop):
    cli, _ = loop
    labels = store(cli.home)
    good, bad = generate_examples(10, 1.0, seed=5), generate_examples(10, 0.0, seed=6)
    labels.add_items(PIPELINE, "second-round", [  # a clear preference each, so every judgement is a new pair
        NewItem([{"role": "user", "content": g["prompt"]}], g["completion"], b["completion"], {}, {}) for g, b in zip(good, bad)
    ])
    annotator = labels.authenticate(labels.add_annotator("second-round"))
    with sqlite3.connect(cli.home / "labels.db") as db:
        second_round = [item for (item,) in db.execute("SELECT id FROM items WHERE batch = 'second-round' ORDER BY id")]
    api = PrefectApi(prefect_api())
    serving = cli.start("serve", PIPELINE)
    try:
        deployment = api.served(PIPELINE, serving)
        before = counts(cli.home)
        for item in second_round[:5]:
            labels.judge(annotator.id, item, "A")
        early = api.triggered_run(deployment, 900)
        assert early["state"]["type"] == "COMPLETED", serving.log.read_text()[-4000:]
        assert counts(cli.home) == before
        assert "nothing new: 5 of 10 judgements since the last completed run" in serving.log.read_text()

        for item in second_round[5:]:
            labels.judge(annotator.id, item, "A")
        due = api.triggered_run(deployment, 900)
        assert due["state"]["type"] == "COMPLETED", serving.log.read_text()[-4000:]
        after = counts(cli.home)
        assert {stage: after[stage] - before[stage] for stage in after} == {
            "data": 0, "sft": 0, "propose": 0, "reward": 1, "ppo": 1, "evaluate": 1}
    finally:
        kill_group(serving)
