from pathlib import Path

import pytest

from conftest import Cli
from rlhf.config import load_file, load_pipeline, parse_override
from rlhf.errors import InputError


def test_unknown_key_names_dotted_path_and_allowed_keys(project: Path):
    with pytest.raises(InputError) as err:
        load_pipeline(project / "pipelines.yaml", "tiny", ["stages.data.bogus=1"])
    message = str(err.value)
    assert "pipelines.tiny.stages.data.bogus" in message
    assert "allowed keys here: eval_fraction, gold_reward, instructions, preferences, prompts" in message


def test_unknown_key_inside_a_source_names_the_path_without_the_union_tag(project: Path):
    with pytest.raises(InputError) as err:
        load_pipeline(project / "pipelines.yaml", "tiny", ["stages.data.preferences.colour=red"])
    assert "'pipelines.tiny.stages.data.preferences.colour'" in str(err.value)
    assert "format, on_invalid, path, source" in str(err.value)


def test_wrong_value_names_path_and_value(project: Path):
    with pytest.raises(InputError) as err:
        load_pipeline(project / "pipelines.yaml", "tiny", ["stages.data.eval_fraction=lots"])
    assert "'pipelines.tiny.stages.data.eval_fraction'" in str(err.value)
    assert "'lots'" in str(err.value)


def test_overrides_parse_yaml_scalars_and_apply(project: Path):
    assert parse_override("a.b=10") == (["a", "b"], 10)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=x=y") == (["a"], "x=y")
    _, pipeline = load_pipeline(project / "pipelines.yaml", None, ["seed=7", "stages.data.instructions.examples=99"])
    assert pipeline.seed == 7 and pipeline.stages.data.instructions.examples == 99


def test_bad_override_syntax_and_unknown_pipeline(project: Path):
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        load_pipeline(project / "pipelines.yaml", "tiny", ["seed"])
    with pytest.raises(InputError, match="no pipeline named 'nope'; defined: hh-tiny, tiny, tiny-dpo, tiny-grpo, tiny-human, tiny-ppo, tiny-reinforce, tiny-rlhf, tiny-rloo"):
        load_pipeline(project / "pipelines.yaml", "nope")
    with pytest.raises(InputError, match="'seed' is a value, not a section"):
        load_pipeline(project / "pipelines.yaml", "tiny", ["seed.x=1"])


def test_relative_paths_resolve_against_the_config_file(project: Path):
    _, pipeline = load_pipeline(project / "pipelines.yaml", "tiny")
    assert pipeline.stages.data.preferences.path == project / "prefs.jsonl"


def test_the_shipped_pipelines_file_is_valid():
    parsed = load_file(Path(__file__).resolve().parents[1] / "pipelines.yaml")
    assert parsed.default == "demo"
    assert parsed.pipelines["demo"].stages.data.instructions.source == "synthetic_reviews"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("schedule.cron='61 * * * *'", "'pipelines.tiny-ppo.schedule.cron': Value error, not a cron expression"),
        ("schedule.timezone=Mars/Base", "'pipelines.tiny-ppo.schedule.timezone': Value error, not an IANA time zone"),
        ("schedule.interval=60", "'pipelines.tiny-ppo.schedule': Value error, give exactly one of 'cron' and 'interval'"),
    ],
)
def test_a_bad_schedule_names_its_key(project: Path, override: str, expected: str):
    with pytest.raises(InputError) as err:
        load_pipeline(project / "pipelines.yaml", "tiny-ppo", [override])
    assert expected in str(err.value)


def test_schedule_overrides_must_give_a_valid_pipeline(project: Path):
    text = (project / "pipelines.yaml").read_text()
    (project / "pipelines.yaml").write_text(text.replace('timezone: Europe/Berlin}', 'timezone: UTC, overrides: ["stages.ppo.epochs=zero"]}'))
    with pytest.raises(InputError) as err:
        load_file(project / "pipelines.yaml")
    assert "pipelines.tiny-ppo.schedule.overrides:" in str(err.value) and "'pipelines.tiny-ppo.stages.ppo.epochs'" in str(err.value)


def test_serve_without_a_prefect_server_or_schedule_exits_2(project):
    cli = Cli(project, project / "home", temporary_prefect=True)  # no PREFECT_API_URL
    no_server = cli("serve", "tiny-ppo", timeout=120)
    assert no_server.returncode == 2 and "schedules need a Prefect server" in no_server.stderr
    no_schedule = cli("serve", "tiny", timeout=120)
    assert no_schedule.returncode == 2 and "pipelines.tiny has no 'schedule:'" in no_schedule.stderr


def test_the_shipped_pipelines_validate_and_read_only_files_inside_the_repository():
    from rlhf.blocks import FileSource
    from rlhf.config import load_file

    root = Path(__file__).resolve().parents[1]
    shipped = load_file(root / "pipelines.yaml")
    for name, pipeline in shipped.pipelines.items():
        data = pipeline.stages.data
        for source in (data.instructions, data.preferences, data.prompts):
            if isinstance(source, FileSource):
                assert source.path.is_file() and source.path.is_relative_to(root), (name, source.path)


def test_trainer_args_reach_any_trl_key_and_are_checked_by_trl(project: Path):
    _, pipeline = load_pipeline(
        project / "pipelines.yaml", "tiny-rlhf", ["stages.sft.trainer_args.max_grad_norm=0.5", "stages.reward.trainer_args.center_rewards_coefficient=0.01"]
    )
    assert pipeline.stages.sft.trainer_args == {"max_grad_norm": 0.5}
    with pytest.raises(InputError, match=r"'pipelines.tiny-rlhf.stages.sft.trainer_args': .*'no_such_arg' is not an argument of trl.SFTConfig"):
        load_pipeline(project / "pipelines.yaml", "tiny-rlhf", ["stages.sft.trainer_args.no_such_arg=1"])
    with pytest.raises(InputError, match=r"'learning_rate' is set by this stage's own keys"):
        load_pipeline(project / "pipelines.yaml", "tiny-rlhf", ["stages.reward.trainer_args.learning_rate=1"])
    with pytest.raises(InputError, match=r"trl.SFTConfig refuses them"):
        load_pipeline(project / "pipelines.yaml", "tiny-rlhf", ["stages.sft.trainer_args.optim=bogus"])


def test_ppo_without_sft_or_reward_stages_names_what_it_needs(project: Path):
    with pytest.raises(InputError, match=r"stages.ppo.policy is required when no stage of the pipeline provides a policy"):
        load_pipeline(project / "pipelines.yaml", "tiny", ["stages.ppo.iterations=2"])
    with pytest.raises(InputError, match=r"stages.ppo.policy: the sft stage provides it"):
        load_pipeline(project / "pipelines.yaml", "tiny-ppo", ["stages.ppo.policy.init=pretrained", "stages.ppo.policy.path=x"])
    with pytest.raises(InputError, match=r"stages.ppo.reward_model is required when no stage of the pipeline provides a reward model"):
        load_pipeline(
            project / "pipelines.yaml", "tiny",
            ["stages.ppo.iterations=2", "stages.ppo.policy.init=pretrained", "stages.ppo.policy.path=x"],
        )


def test_batches_split_evenly_over_workers_and_ppo_minibatches(project: Path):
    with pytest.raises(InputError) as err:
        load_pipeline(project / "pipelines.yaml", "tiny-ppo", ["ray.num_workers=3"])
    assert "stages.sft.batch_size (16) must be a multiple of ray.num_workers (3)" in str(err.value)
    with pytest.raises(InputError) as err:
        load_pipeline(project / "pipelines.yaml", "tiny-ppo", ["ray.num_workers=8"])
    assert "stages.ppo.batch_size (8) must be a multiple of ray.num_workers x stages.ppo.minibatches (8 x 2)" in str(err.value)
    _, pipeline = load_pipeline(project / "pipelines.yaml", "tiny-ppo", ["ray.num_workers=4"])
    assert pipeline.ray.num_workers == 4


@pytest.mark.parametrize("override, expected", [
    ("pipelines.tiny-rlhf.schedule={cron: '0 3 * * *', min_new_labels: 5}",
     "schedule.min_new_labels: no stage of this pipeline reads judgements (pairs: {source: labels})"),
    ("pipelines.tiny-human.stages.propose.policy=demo-policy",
     "stages.propose.policy: 'demo-policy' is not a registered model, models:/NAME@ALIAS"),
    ("pipelines.tiny-human.stages.reward.pairs.min_gold_accuracy=1.5", "'pipelines.tiny-human.stages.reward.pairs.min_gold_accuracy'"),
    ("pipelines.tiny-human.labels.bogus=1", "'pipelines.tiny-human.labels.bogus'"),
])
def test_the_human_loop_keys_are_checked(project: Path, override: str, expected: str):
    name, _, key = override.partition(".")[2].partition(".")
    with pytest.raises(InputError) as err:
        load_pipeline(project / "pipelines.yaml", name, [key])
    assert expected in str(err.value)


def test_gold_checks_and_simulated_annotators_need_a_gold_reward(project: Path):
    text = (project / "pipelines.yaml").read_text().replace(
        "data: {instructions: {source: synthetic_reviews, examples: 600}, eval_fraction: 0.2}",
        "data: {prompts: {source: file, path: prefs.jsonl}, eval_fraction: 0.2}")
    (project / "pipelines.yaml").write_text(text)
    with pytest.raises(InputError) as err:
        load_pipeline(project / "pipelines.yaml", "tiny-human", [])
    assert "stages.propose.gold_checks: needs the task's gold reward (stages.data.gold_reward)" in str(err.value)
    _, pipeline = load_pipeline(project / "pipelines.yaml", "tiny-human", ["stages.propose.gold_checks=0"])
    assert pipeline.stages.judged() == ["reward"] and pipeline.stages.present().index("propose") < pipeline.stages.present().index("reward")
