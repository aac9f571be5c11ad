import pytest

from flows.plan import plan
from rlhf.errors import InputError

STAGES = ["data", "sft", "reward", "ppo"]


def test_default_reuses_and_from_forces_the_rest():
    assert plan(STAGES, None, None) == dict.fromkeys(STAGES, "auto")
    assert plan(STAGES, "reward", None) == {"data": "auto", "sft": "auto", "reward": "force", "ppo": "force"}


def test_only_requires_upstream_and_reuses_unless_forced():
    assert plan(STAGES, None, "reward") == {"data": "require", "sft": "require", "reward": "auto"}
    assert plan(STAGES, "reward", "reward") == {"data": "require", "sft": "require", "reward": "force"}


def test_bad_selections_name_the_option():
    with pytest.raises(InputError, match="--only evaluate: no such stage in this pipeline; stages: data, sft, reward, ppo"):
        plan(STAGES, None, "evaluate")
    with pytest.raises(InputError, match="--from sft --only reward: together they must name the same stage"):
        plan(STAGES, "sft", "reward")
