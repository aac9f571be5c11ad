"""Mistakes in the pipelines file itself and in the global options, made as a user makes them: each is an
`InputError` (exit 2, one `error:` line) naming the file and the dotted key, or the option; never a traceback."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rlhf import home as rlhf_home
from rlhf.config import load_file, load_pipeline, parse_override, read_yaml
from rlhf.errors import InputError
from rlhf.graph import GRAPH

ROOT = Path(__file__).resolve().parents[1]
BOUNDED = settings(max_examples=150, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

GOOD = """\
default: p
pipelines:
  p:
    tracking: {experiment: e}
    stages:
      data:
        instructions: {source: synthetic_reviews, examples: 100}
"""


def one_line(message: str) -> bool:
    return message.isprintable() and len(message) < 2000


def loads_or_names(path: Path, name: str | None = None, overrides: tuple[str, ...] = ()) -> None:
    """Every way a command loads the file either succeeds or names the file (or the `--set`), in one line."""
    for load in (lambda: load_file(path), lambda: load_pipeline(path, name, list(overrides))):
        try:
            load()
        except InputError as error:
            message = str(error)
            assert message.startswith(f"{path}: ") or message.startswith("--set "), message
            assert one_line(message), message


# ------------------------------------------------------------------ the file's bytes


@BOUNDED
@given(data=st.binary(max_size=300))
@example(data=b"\xef\xbb\xbf" + GOOD.encode()).via("a BOM")
@example(data=GOOD.encode("utf-16")).via("UTF-16")
@example(data=GOOD.replace("e}", "caf\xe9}").encode("latin-1")).via("Latin-1")
@example(data=GOOD.encode() + b"\x00\x01").via("binary junk after good YAML")
def test_random_bytes_as_the_config_file(tmp_path, data):
    path = tmp_path / "pipelines.yaml"
    path.write_bytes(data)
    loads_or_names(path)


@pytest.mark.parametrize(
    "data, expected",
    [
        (GOOD.replace("e}", "caf\xe9}").encode("latin-1"), "line 4: not UTF-8 text (byte 0xe9)"),
        (GOOD.encode("utf-16"), "line 1: not UTF-8 text (byte 0xff)"),
    ],
)
def test_a_file_not_in_utf8_names_the_line(tmp_path, data, expected):
    path = tmp_path / "pipelines.yaml"
    path.write_bytes(data)
    with pytest.raises(InputError) as raised:
        read_yaml(path)
    assert str(raised.value).startswith(f"{path}: {expected}"), raised.value


# ------------------------------------------------------------------- its YAML structure

STAGE_NAMES = sorted(GRAPH)
FIELDS = ["tracking", "experiment", "stages", "seed", "ray", "num_workers", "schedule", "cron", "overrides", "instructions",
          "preferences", "source", "path", "examples", "model", "init", "adapter", "type", "lora", "r", "critic_lora",
          "target_modules", "pairs", "policy", "reward_model", "kl", "beta", "batch_size", "learning_rate", "candidate"]
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.sampled_from(
    ["synthetic_reviews", "file", "hub", "pretrained", "scratch", "lora", "policy", "data", "auto", "all-linear", "p"]
)
keys = st.sampled_from(FIELDS + STAGE_NAMES) | st.text(max_size=6) | st.integers(-2, 2) | st.none() | st.booleans()
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4), max_leaves=12)
# mostly near-valid: the right keys at the top, so that most examples reach the stage blocks and what is inside them
block = junk | st.dictionaries(st.sampled_from(FIELDS) | keys, junk, max_size=5)
data = st.just({"instructions": {"source": "synthetic_reviews", "examples": 100}}) | block
stages = junk | st.fixed_dictionaries({"data": data}, optional={name: block for name in STAGE_NAMES if name != "data"} | {"bogus": junk})
pipeline = junk | st.fixed_dictionaries(
    {"tracking": st.just({"experiment": "e"}) | junk, "stages": stages}, optional={"seed": scalars, "ray": block, "schedule": block}
)
files = junk | st.fixed_dictionaries(
    {"default": st.just("p") | junk, "pipelines": junk | st.fixed_dictionaries({"p": pipeline}, optional={"q": pipeline, "r": pipeline})},
    optional={"extra": junk},
)


@BOUNDED
@given(raw=files, name=st.sampled_from([None, "p"]), overrides=st.sampled_from([(), ("seed=1",), ("stages.data.eval_fraction=0.5",)]))
@example(raw={"default": "p", "pipelines": 3}, name=None, overrides=()).via("pipelines: a number")
@example(raw={"default": "p", "pipelines": "pq"}, name="p", overrides=("seed=1",)).via("pipelines: a string")
@example(raw={"default": "p", "pipelines": {"p": 3}}, name="p", overrides=("seed=1",)).via("a pipeline that is a number")
@example(raw={"default": "p", "pipelines": {"p": [1]}}, name="p", overrides=("stages.data.eval_fraction=0.5",)).via("a list")
@example(raw={"default": ["p"], "pipelines": {}}, name=None, overrides=()).via("default: a list")
@example(raw={"default": "q", "pipelines": {1: {}, "a": {}}}, name=None, overrides=()).via("keys of mixed kinds")
@example(raw={"default": "p", "pipelines": {"p": {"stages": {"ppo": {"critic_lora": 3}}}}}, name=None, overrides=())
@example(raw={"default": "p", "pipelines": {"p": {"stages": {"sft": {"adapter": {"type": "lora", "target_modules": [[1]]}}}}}},
         name=None, overrides=()).via("a union without a tag")
@example(raw={"default": "p", "pipelines": {"p": {"a\nb": 1}}}, name=None, overrides=()).via("a key with a newline")
def test_random_yaml_structures_name_the_dotted_key(tmp_path, raw, name, overrides):
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    loads_or_names(path, name, overrides)


SHIPPED = yaml.safe_load((ROOT / "pipelines.yaml").read_text())


@BOUNDED
@given(data=st.data(), value=junk, overrides=st.sampled_from([(), ("seed=1",), ("stages.sft.lora.r=2",)]))
def test_junk_anywhere_in_the_shipped_file(tmp_path, data, value, overrides):
    """The shipped file with one value, at any depth, replaced by junk (or one key added)."""
    raw = copy.deepcopy(SHIPPED)
    node, trail = raw, []
    while True:
        new = not node or data.draw(st.integers(0, 9)) == 7  # mostly a key that is there, to reach deep
        key = data.draw(keys if new else st.sampled_from(sorted(node, key=str)))
        trail.append(key)
        if not isinstance(node.get(key), dict) or data.draw(st.integers(0, 4)) == 3:
            node[key] = value
            break
        node = node[key]
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    name = trail[1] if trail[0] == "pipelines" and len(trail) > 1 and isinstance(trail[1], str) else None
    loads_or_names(path, name, overrides)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("default: p\npipelines: [p]\n", "'pipelines': Input should be a valid dictionary"),
        ("default: p\npipelines: 3\n", "'pipelines': Input should be a valid dictionary"),
        ("default: p\npipelines:\n  p: 3\n", "'pipelines.p': Input should be a valid dictionary"),
        ("default: [p]\npipelines: {}\n", "'default': Input should be a valid string"),
        ("pipelines: {}\n", "'default': Field required"),
        ("default: p\npipelines:\n  p:\n    stages: *nope\n", "line 4, column 13: not valid YAML: found undefined alias"),
        ("default: p\npipelines:\n\tp: 1\n", "line 3, column 1: not valid YAML: found character that cannot start any token (a tab: YAML indents with spaces)"),
    ],
)
def test_a_file_of_the_wrong_shape_names_the_key(tmp_path, text, expected):
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    for load in (lambda: load_file(path), lambda: load_pipeline(path, None, ["seed=1"])):
        with pytest.raises(InputError) as raised:
            load()
        assert str(raised.value).startswith(f"{path}: {expected}"), raised.value


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD + "      data:\n        instructions: {source: synthetic_reviews}\n", "line 8, column 7: not valid YAML: found duplicate key 'data' (first on line 6)"),
        (GOOD.replace("examples: 100", "examples: 100, examples: 200"), "line 7, column 66: not valid YAML: found duplicate key 'examples' (first on line 7)"),
    ],
)
def test_a_key_given_twice_is_refused_but_merge_keys_may_still_be_overridden(tmp_path, text, expected):
    path = tmp_path / "pipelines.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as raised:
        load_file(path)
    assert str(raised.value).startswith(f"{path}: {expected}"), raised.value
    path.write_text(GOOD.replace("  p:\n", "  p: &pipe\n") + "  q:\n    <<: *pipe\n    seed: 3\n")
    parsed = load_file(path)
    assert parsed.pipelines["q"].seed == 3 and parsed.pipelines["p"].seed == 0


def test_a_bad_schedule_override_names_the_file_first(tmp_path):
    path = tmp_path / "pipelines.yaml"
    path.write_text(GOOD.replace("    stages:", "    schedule: {interval: 60, overrides: [seed=x]}\n    stages:"))
    with pytest.raises(InputError) as raised:
        load_file(path)
    assert str(raised.value).startswith(f"{path}: pipelines.p.schedule.overrides: 'pipelines.p.seed': Input should be"), raised.value


def test_a_home_that_cannot_be_created(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(InputError, match=rf"^home {tmp_path / 'h'} \(--home, RLHF_HOME\): cannot create it: Permission denied$"):
        rlhf_home.prepare_stages(tmp_path / "h")


def test_a_key_inside_a_union_without_a_tag_is_named(tmp_path):
    with pytest.raises(InputError, match=r"'pipelines.demo.stages.ppo.critic_lora.r': Input should be greater than or equal to 1"):
        load_pipeline(ROOT / "pipelines.yaml", "demo", ["stages.ppo.critic_lora.r=0"])
    with pytest.raises(InputError, match=r"'pipelines.demo.stages.ppo.lora.target_modules'"):
        load_pipeline(ROOT / "pipelines.yaml", "demo", ["stages.ppo.lora.target_modules=3"])


def test_a_kl_floor_above_the_starting_beta_is_named():
    with pytest.raises(InputError, match=r"'pipelines.demo.stages.ppo.kl': .*min_beta \(0.5\) is above beta"):
        load_pipeline(ROOT / "pipelines.yaml", "demo", ["stages.ppo.kl.min_beta=0.5"])


def test_numbers_with_an_exponent_are_numbers_as_in_yaml_12(tmp_path):
    # PyYAML reads `1e-8` as text: TRL would take trainer_args.adam_epsilon as the string '1e-8' and fail at training
    assert parse_override("stages.sft.trainer_args.adam_epsilon=1e-8") == (["stages", "sft", "trainer_args", "adam_epsilon"], 1e-8)
    assert parse_override("a=1.0e8")[1] == 1e8 and parse_override("a=-.5E+3")[1] == -500.0
    assert parse_override("a=1e") == (["a"], "1e") and parse_override("a=0x1e")[1] == 30
    path = tmp_path / "pipelines.yaml"
    path.write_text("x: 5e3\ny: '5e3'\n")
    assert read_yaml(path) == {"x": 5000.0, "y": "5e3"}


# ------------------------------------------------------------------------- --set

set_keys = st.lists(st.sampled_from(["stages", "data", "ppo", "critic_lora", "r", "seed", "tracking", "", " "]) | st.text(max_size=5),
                    min_size=1, max_size=4).map(".".join)
set_values = st.text(max_size=20) | st.sampled_from(["{}", "[]", "null", "3", "{a: 1}", "&a [*a]", "1e-3"])


@BOUNDED
@given(text=st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", set_keys, set_values))
@example(text="stages..data=1").via("an empty segment")
@example(text=".=1")
def test_random_set_strings(tmp_path, text):
    try:
        keys, _ = parse_override(text)
    except InputError as error:
        assert str(error).startswith("--set ") and one_line(str(error)), error
    else:
        assert all(keys), keys
    path = tmp_path / "pipelines.yaml"
    path.write_text(GOOD)
    loads_or_names(path, "p", (text,))


@pytest.mark.parametrize("text", ["stages..data=1", ".=1", "seed.=1"])
def test_an_empty_key_in_set_is_named(text):
    with pytest.raises(InputError, match=r"^--set .*: an empty key between dots"):
        parse_override(text)


# ------------------------------------------------------------- --config and --home paths

# names of printable characters: a path with a control character in it is not a user's mistake to guard against
names = st.text(st.characters(categories=["L", "N", "P", "S"], include_characters=" ", exclude_characters="/"), min_size=1, max_size=8)
KINDS = st.lists(st.tuples(st.sampled_from(["dir", "file", "missing"]), names), min_size=1, max_size=3)


def build(root: Path, parts: list[tuple[str, str]]) -> Path:
    """A path of the given kinds below `root`: each part a directory, a file or nothing, as far as that can be."""
    path = root
    for kind, name in parts:
        if name in (".", ".."):
            name += "x"
        path = path / name
        if path.parent.is_dir() and not path.exists():
            if kind == "dir":
                path.mkdir()
            elif kind == "file":
                path.write_text(GOOD)
    return path


@BOUNDED
@given(parts=KINDS)
def test_any_kind_of_config_path(tmp_path_factory, parts):
    path = build(tmp_path_factory.mktemp("config"), parts)
    try:
        read_yaml(path)
    except InputError as error:
        assert str(error).startswith(f"{path}: ") and one_line(str(error)), error


@BOUNDED
@given(parts=KINDS)
def test_any_kind_of_home_path(tmp_path_factory, parts):
    path = build(tmp_path_factory.mktemp("home"), parts)
    try:
        home = rlhf_home.resolve(str(path))
    except InputError as error:
        assert str(error).startswith(f"--home {path}: ") and one_line(str(error)), error
        assert any(p.is_file() for p in (path, *path.parents)), error
    else:
        assert home == path.resolve() and not any(p.is_file() for p in (path, *path.parents))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp, "is a directory, not a pipelines file"),
        (lambda tmp: tmp / "afile" / "pipelines.yaml", "config file not found"),
    ],
)
def test_a_config_path_of_the_wrong_kind(tmp_path, make, expected):
    (tmp_path / "afile").write_text("x")
    path = make(tmp_path)
    with pytest.raises(InputError) as raised:
        load_pipeline(path, None)
    assert str(raised.value).startswith(f"{path}: {expected}"), raised.value


def test_an_unreadable_config_file(tmp_path, monkeypatch):
    path = tmp_path / "pipelines.yaml"
    path.write_text(GOOD)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    monkeypatch.setattr(Path, "read_text", refuse)
    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(InputError) as raised:
        read_yaml(path)
    assert str(raised.value) == f"{path}: cannot read the config file: Permission denied"


def test_a_home_that_is_a_file_or_under_one(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=rf"^--home afile: {tmp_path / 'afile'} is a file, not a directory$"):
        rlhf_home.resolve("afile")
    with pytest.raises(InputError, match=rf"^RLHF_HOME afile/sub: {tmp_path / 'afile'} is a file, not a directory$"):
        rlhf_home.resolve("afile/sub", option="RLHF_HOME")
    with pytest.raises(InputError, match=r"^--home ~no-such-user-here/x: "):
        rlhf_home.resolve("~no-such-user-here/x")
    assert rlhf_home.resolve("new/home") == tmp_path / "new" / "home"


# ------------------------------------------------------- a given reward model's path

REWARD_MODEL_STAGES = [name for name, stage in GRAPH.items() if "reward_model" in stage.config.model_fields]


def given_reward_model(stage: str, reward_model: str) -> str:
    """A pipeline of the data stage and `stage` on a given policy and reward model."""
    config = GRAPH[stage].config
    needed = {"learning_rate": 0.1, "pairs": {"source": "policy"}}
    registered = str in typing.get_args(config.model_fields["policy"].annotation)  # propose samples a registered policy
    block = {"policy": "models:/p-policy@champion" if registered else {"init": "pretrained", "path": "some/model"}, "reward_model": reward_model}
    block |= {key: value for key, value in needed.items() if key in config.model_fields and config.model_fields[key].is_required()}
    raw = yaml.safe_load(GOOD)
    raw["pipelines"]["p"]["stages"][stage] = block
    return yaml.safe_dump(raw)


def test_a_relative_reward_model_is_relative_to_the_config_file_in_every_stage(tmp_path, monkeypatch):
    assert {"ppo", "grpo", "rloo", "reinforce", "dpo"} <= set(REWARD_MODEL_STAGES)
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    expected = tmp_path / "project" / "models" / "rm"
    resolved = {}
    for stage in REWARD_MODEL_STAGES:
        (tmp_path / "project" / f"{stage}.yaml").write_text(given_reward_model(stage, "models/rm"))
        path = Path(f"../project/{stage}.yaml")
        resolved[stage] = {getattr(load_file(path).pipelines["p"].stages, stage).reward_model,
                           getattr(load_pipeline(path, "p")[1].stages, stage).reward_model}
    assert resolved == {stage: {expected} for stage in REWARD_MODEL_STAGES}


# ------------------------------------------------------------- the CLI, as a user runs it


def rlhf(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", **env}
                          | {key: os.environ[key] for key in ("PYTHONPATH",) if key in os.environ})


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["--home", "afile", "status", "--config", "good.yaml"], {}, "error: --home afile: {tmp}/afile is a file, not a directory"),
        (["ui", "--port", "5999"], {"RLHF_HOME": "afile/sub"}, "error: RLHF_HOME afile/sub: {tmp}/afile is a file, not a directory"),
        (["--home", "h", "list", "--config", "."], {}, "error: .: is a directory, not a pipelines file"),
        (["--home", "h", "status", "--config", "scalar.yaml"], {}, "error: scalar.yaml: 'pipelines': Input should be a valid dictionary (got 3)"),
        (["--home", "h", "run", "--config", "latin1.yaml"], {}, "error: latin1.yaml: line 4: not UTF-8 text (byte 0xe9)"),
    ],
)
def test_the_cli_says_one_line_and_exits_2(tmp_path, args, env, expected):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "scalar.yaml").write_text("default: p\npipelines: 3\n")
    (tmp_path / "latin1.yaml").write_bytes(GOOD.replace("e}", "caf\xe9}").encode("latin-1"))
    done = rlhf(tmp_path, *args, **env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected.format(tmp=tmp_path)), done.stderr


@pytest.mark.parametrize("command", ["validate", "run", "status"])
def test_a_reward_model_that_is_a_file_is_named_by_file_and_key_before_any_stage_runs(tmp_path, command):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "rm").write_text("not a model")
    (tmp_path / "project" / "pipelines.yaml").write_text(given_reward_model("grpo", "rm"))
    done = rlhf(tmp_path, "--home", "h", command, "--config", "project/pipelines.yaml")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: project/pipelines.yaml: 'pipelines.p.stages.grpo.reward_model': {tmp_path / 'project' / 'rm'} "
        "is not a saved model directory (no config.json)"
    ]
    assert not (tmp_path / "h" / "runs").exists()
