"""Property tests: whatever bytes, JSON shapes or `--set` text a user gives, the answer is an
`InputError` naming the file (and row) or the dotted key, never another exception or a hang."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rlhf.blocks import FileSource

from rlhf.config import load_pipeline
from rlhf.data import prepare
from rlhf.data.formats import CONVERTERS
from rlhf.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
BOUNDED = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROLES = st.sampled_from(sorted(CONVERTERS))
POLICIES = st.sampled_from(["error", "drop"])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)
# rows that look almost right: the field names the readers look for, holding anything
near_rows = st.dictionaries(
    st.sampled_from(["prompt", "completion", "chosen", "rejected", "messages", "role", "content"]) | st.text(max_size=8),
    json_values | st.lists(st.dictionaries(st.sampled_from(["role", "content"]), json_values, max_size=2), max_size=3),
    max_size=4,
)


def check(path: Path, role: str, on_invalid: str, fmt: str = "auto") -> None:
    """Reading either succeeds or raises an InputError that starts with the file's path."""
    source = FileSource(source="file", path=path, format=fmt, on_invalid=on_invalid)
    try:
        examples, dropped, rows, where = prepare.read_examples(source, role, seed=0)
    except InputError as error:
        assert str(error).startswith(f"{path}:"), error
        assert "\n" not in str(error)
    else:
        assert where == str(path) and len(examples) + sum(dropped.values()) == rows


@BOUNDED
@given(data=st.binary(max_size=400), suffix=st.sampled_from(["jsonl", "json", "csv", "parquet"]), role=ROLES, on_invalid=POLICIES)
def test_random_bytes_in_any_format(data, suffix, role, on_invalid):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rows.{suffix}"
        path.write_bytes(data)
        check(path, role, on_invalid)


@BOUNDED
@given(rows=st.lists(near_rows | json_values, min_size=1, max_size=6), role=ROLES, on_invalid=POLICIES)
def test_random_json_shapes_name_the_row(rows, role, on_invalid):
    with tempfile.TemporaryDirectory() as tmp:
        lines, whole = Path(tmp) / "rows.jsonl", Path(tmp) / "rows.json"
        lines.write_text("".join(json.dumps(row) + "\n" for row in rows))
        whole.write_text(json.dumps(rows))
        for path in (lines, whole):
            try:
                prepare.read_examples(FileSource(source="file", path=path, on_invalid=on_invalid), role, seed=0)
            except InputError as error:
                message = str(error)
                assert message.startswith(f"{path}: row ") or (on_invalid == "drop" and "no valid rows" in message), message


@BOUNDED
@given(rows=st.lists(st.dictionaries(st.sampled_from(["prompt", "completion", "chosen", "rejected", "x"]),
                                     st.text(max_size=20) | st.integers().map(str), max_size=5), min_size=1, max_size=6),
       role=ROLES, on_invalid=POLICIES)
def test_random_tables_in_csv_and_parquet(rows, role, on_invalid):
    with tempfile.TemporaryDirectory() as tmp:
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, Path(tmp) / "rows.parquet")
        table.to_pandas().to_csv(Path(tmp) / "rows.csv", index=False)
        for name in ("rows.parquet", "rows.csv"):
            check(Path(tmp) / name, role, on_invalid)


@pytest.mark.parametrize(
    "suffix, text, expected",
    [
        ("jsonl", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "row 1: JSON nested too deeply"),
        ("json", "[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
        ("jsonl", '{"prompt": ' + "9" * 5000 + "}\n", "row 1: not usable JSON: Exceeds the limit"),
        ("jsonl", json.dumps({"prompt": "x" * 5_000_000, "completion": 1}) + "\n", "row 1: 'completion' must be text"),
        ("csv", "prompt,completion\n" + "y" * 200_000 + ",z\n", "malformed CSV: field larger than field limit"),
        ("jsonl", b'{"prompt": "a", "completion": "b"}\n\xff\n', "line 2: not valid UTF-8"),
    ],
)
def test_deep_nesting_huge_fields_and_bad_encodings(tmp_path, suffix, text, expected):
    path = tmp_path / f"rows.{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(InputError) as raised:
        prepare.read_examples(FileSource(source="file", path=path), "instructions", seed=0)
    assert str(raised.value).startswith(f"{path}: ") and expected in str(raised.value)


KEYS = st.lists(
    st.sampled_from(["stages", "sft", "ppo", "data", "seed", "ray", "num_workers", "lora", "r", "batch_size"])
    | st.text(max_size=6),
    min_size=1, max_size=5,
).map(".".join)
VALUES = st.text(max_size=40) | st.sampled_from(["[1, 2", "{a: [", "!!python/object:os.system", "*x", "&a [*a]"]) | st.just(
    "[" * 5000 + "]" * 5000
)


@BOUNDED
@given(key=KEYS, value=VALUES)
@example(key="seed.x", value="1").via("a value, not a section")
@example(key="stages.sft.batch_size", value="[" * 5000 + "]" * 5000).via("deep YAML")
def test_set_overrides_name_the_dotted_key(key, value):
    try:
        load_pipeline(ROOT / "pipelines.yaml", "demo", [f"{key}={value}"])
    except InputError as error:
        message = str(error)
        assert "\n" not in message and len(message) < 2000, message
        named = f"{key}={value}".partition("=")[0].strip().split(".")[0]  # a key with '=' in it ends there
        assert named in message or "--set" in message, message


def test_validate_reads_every_row_without_starting_anything(tmp_path):
    (tmp_path / "prefs.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + '{"prompt": "q", "chosen": 3, "rejected": "b"}\n'
    )
    (tmp_path / "pipelines.yaml").write_text(
        "default: p\npipelines:\n  p:\n    tracking: {experiment: e}\n"
        "    stages:\n      data:\n        preferences: {source: file, path: prefs.jsonl}\n"
    )
    done = subprocess.run([str(Path(sys.executable).parent / "rlhf"), "--home", str(tmp_path / "home"), "validate"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'prefs.jsonl'}: row 2: 'chosen' must be text or a list of messages, got int"]
    assert not (tmp_path / "home" / "prefect").exists() and not (tmp_path / "home" / "mlflow.db").exists()
