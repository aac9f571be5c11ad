"""The stage graph: order and reads derive from it, and a new stage is its recipe, one declaration and its YAML."""

import subprocess
import sys

import pytest

from conftest import Cli
from rlhf.config import load_pipeline
from rlhf.errors import InputError
from rlhf.graph import GRAPH

# the whole of a new stage, as a user would add it: its block, its recipe and one `declare`
TOY_STAGE = '''
from rlhf.blocks import StageConfig
from rlhf.data.prepare import load_splits
from rlhf.graph import Stage, declare
from rlhf.lifecycle import StageResult


class ToyStage(StageConfig):
    word: str


def count_prompts(ctx):
    prompts = load_splits(ctx.input("data") / "prompts")["train"]
    (ctx.outputs / "echo.txt").write_text(ctx.config.word * len(prompts))
    return StageResult(metrics={"prompts": float(len(prompts))}, headline="prompts")


declare(Stage("toy", ToyStage, "toy_stage:count_prompts", needs=("data",)))
'''
TOY_PIPELINE = """
  toy-pipeline:
    tracking: {experiment: tests}
    stages:
      data:
        preferences: {source: file, path: prefs.jsonl}
      toy: {word: hi}
"""


def test_a_new_stage_is_a_recipe_a_declaration_and_yaml(project):
    (project / "toy_stage.py").write_text(TOY_STAGE)
    (project / "pipelines.yaml").write_text(project.joinpath("pipelines.yaml").read_text() + TOY_PIPELINE)

    def rlhf(*args):
        # the plug-in is imported before the CLI, as a user's own entry point would
        command = [sys.executable, "-c", "import toy_stage, flows.cli; flows.cli.main()", "--home", str(project / "home"), *args]
        return subprocess.run(command, cwd=project, env=Cli(project, project / "home").env(), capture_output=True, text=True, timeout=600)

    first = rlhf("run", "toy-pipeline")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "│ toy   │ ran" in first.stdout and "prompts = " in first.stdout
    [echo] = (project / "home" / "runs" / "toy-pipeline" / "toy").glob("*/outputs/echo.txt")
    assert echo.read_text().startswith("hihi")

    status = rlhf("status", "toy-pipeline")
    assert status.returncode == 0 and status.stdout.count("complete") == 2, status.stdout
    changed = rlhf("status", "toy-pipeline", "--set", "stages.toy.word=yo")  # its own key changes its fingerprint alone
    assert [line.split("│")[2].strip() for line in changed.stdout.splitlines() if line.startswith("│ ")] == ["complete", "not run"]


def test_order_and_reads_follow_the_graph_and_evaluate_picks_its_candidate(project):
    _, pipeline = load_pipeline(project / "pipelines.yaml", "tiny-ppo")
    assert pipeline.stages.present() == ["data", "sft", "reward", "ppo", "evaluate"]
    assert pipeline.stages.reads("evaluate") == ["data", "sft", "reward", "ppo"]
    assert (pipeline.stages.evaluate.candidate, pipeline.stages.evaluate.baseline) == ("ppo", "sft")
    assert {"ppo", "grpo", "rloo", "reinforce", "dpo"} <= {name for name, stage in GRAPH.items() if "policy" in stage.provides}
    assert pipeline.stages.providers("ppo") == {"data": "data", "policy": "sft", "reward_model": "reward"}
    with pytest.raises(InputError, match="stages.evaluate.candidate: 'dpo' is not one of this pipeline's policies: sft, ppo"):
        load_pipeline(project / "pipelines.yaml", "tiny-ppo", ["stages.evaluate.candidate=dpo"])
    with pytest.raises(InputError, match="unknown key 'pipelines.tiny-ppo.stages.ppo.samples'"):
        load_pipeline(project / "pipelines.yaml", "tiny-ppo", ["stages.ppo.samples=3"])


def test_a_critic_free_stage_has_no_critic_keys(project):
    overrides = ["stages.grpo={}", "stages.ppo=null", "stages.grpo.critic_lora=null"]
    with pytest.raises(InputError, match="unknown key 'pipelines.tiny-ppo.stages.grpo.critic_lora'"):
        load_pipeline(project / "pipelines.yaml", "tiny-ppo", overrides)
    _, pipeline = load_pipeline(project / "pipelines.yaml", "tiny-ppo", overrides[:2])
    assert pipeline.stages.present() == ["data", "sft", "reward", "grpo", "evaluate"]
    assert pipeline.stages.grpo.samples_per_prompt == 4 and pipeline.stages.grpo.kl.in_loss
