import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from conftest import HH_FILE, preference_rows, write_jsonl
from rlhf.blocks import FileSource
from rlhf.data import formats, prepare, sources
from rlhf.data.formats import RowProblem
from rlhf.errors import InputError


def file_source(path: Path, **kw) -> FileSource:
    return FileSource(source="file", path=path, **kw)


# ------------------------------------------------------------------ formats


def test_instruction_shapes():
    assert formats.instruction({"prompt": "Hi?", "completion": "Hello."}) == {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "completion": [{"role": "assistant", "content": "Hello."}],
    }
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}]
    assert formats.instruction({"messages": chat}) == {"prompt": chat[:2], "completion": chat[2:]}


@pytest.mark.parametrize(
    "row, reason, words",
    [
        ({"prompt": "Hi?"}, "missing", "missing field 'completion'"),
        ({"prompt": "Hi?", "completion": "   "}, "empty", "'completion' is empty"),
        ({"prompt": 3, "completion": "x"}, "wrong_type", "'prompt' must be text or a list of messages, got int"),
        ({"messages": [{"role": "user", "content": "Hi?"}]}, "wrong_type", "must end with an assistant turn"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "wrong_type", "'messages[0]' must be an object with a role"),
    ],
)
def test_invalid_instructions_say_what_is_wrong(row, reason, words):
    with pytest.raises(RowProblem, match=words.replace("[", r"\[").replace("]", r"\]")) as problem:
        formats.instruction(row)
    assert problem.value.reason == reason


def test_preference_shapes():
    explicit = formats.preference({"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."})
    assert explicit["prompt"] == [{"role": "user", "content": "Q?"}]
    assert explicit["chosen"] == [{"role": "assistant", "content": "Good."}]
    implicit = formats.preference(
        {
            "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Good."}],
            "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "Bad."}],
        }
    )
    assert implicit == explicit
    hh = formats.preference({"chosen": "\n\nHuman: Q?\n\nAssistant: Good.", "rejected": "\n\nHuman: Q?\n\nAssistant: Bad."})
    assert hh == explicit


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}, "identical"),
        ({"prompt": "Q?", "rejected": "Bad."}, "missing"),
        ({"chosen": "\n\nHuman: A?\n\nAssistant: x", "rejected": "\n\nHuman: B?\n\nAssistant: y"}, "no_shared_prompt"),
        ({"prompt": "Q?", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}, "wrong_type"),
        ({"chosen": "no dialogue here", "rejected": "\n\nHuman: B?\n\nAssistant: y"}, "wrong_type"),
        ({"chosen": "\n\nHuman: A?\n\nAssistant:", "rejected": "\n\nHuman: A?\n\nAssistant: y"}, "empty"),
    ],
)
def test_invalid_preferences(row, reason):
    with pytest.raises(RowProblem) as problem:
        formats.preference(row)
    assert problem.value.reason == reason


def test_hh_rlhf_file_converts_and_rebuilds_the_original_texts():
    """Every pair splits into a shared prompt and replies that rebuild the original dialogues.

    Validation then rejects the few pairs the public split has with identical
    sides or an empty turn; `on_invalid: drop` counts and drops them.
    """
    rows = [json.loads(line) for line in HH_FILE.read_text().splitlines()]
    assert len(rows) == 1000
    problems = Counter()
    for row in rows:
        pair = formats._split_shared_prompt(formats._parse_hh(row["chosen"], "c"), formats._parse_hh(row["rejected"], "r"))
        assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
        for side in ("chosen", "rejected"):
            rebuilt = "".join(
                f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in pair["prompt"] + pair[side]
            )
            assert rebuilt == row[side]
        try:
            formats.preference(row)
        except RowProblem as problem:
            problems[problem.reason] += 1
    assert set(problems) <= {"identical", "empty"} and problems["identical"] == 6
    assert sum(problems.values()) < 15


# ------------------------------------------------------------------ sources


def test_each_file_format_reads_the_same_rows(tmp_path: Path):
    rows = [{"prompt": "Q?", "completion": f"A{i}."} for i in range(3)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "d.txt").write_text("")
    for suffix in ("jsonl", "json", "parquet", "csv"):
        read = list(sources.read_rows(file_source(tmp_path / f"d.{suffix}")))
        assert read == list(enumerate(rows, 1)), suffix


def test_malformed_files_name_file_and_row(tmp_path: Path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": oops}\n')
    with pytest.raises(InputError, match=rf"{bad_json}: row 3: not valid JSON"):
        list(sources.read_rows(file_source(bad_json)))
    bad_bytes = tmp_path / "bytes.jsonl"
    bad_bytes.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match=rf"{bad_bytes}: line 2: not valid UTF-8"):
        list(sources.read_rows(file_source(bad_bytes)))
    not_object = write_jsonl(tmp_path / "list.jsonl", [[1, 2]])
    with pytest.raises(InputError, match="row 1: expected an object"):
        list(sources.read_rows(file_source(not_object)))
    with pytest.raises(InputError, match="data file not found"):
        list(sources.read_rows(file_source(tmp_path / "absent.jsonl")))
    unknown = tmp_path / "d.txt"
    unknown.write_text("")
    with pytest.raises(InputError, match="cannot tell the format"):
        list(sources.read_rows(file_source(unknown)))


# ------------------------------------------------------------------ prepare


def test_invalid_row_stops_with_file_and_row_or_is_dropped_and_counted(tmp_path: Path):
    rows = preference_rows(5)
    del rows[3]["chosen"]
    rows.append(dict(rows[0]))  # exact duplicate
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(InputError, match=rf"^{path}: row 4: missing field 'chosen'$"):
        prepare.normalize(sources.read_rows(file_source(path)), formats.preference, str(path), "error")
    kept, dropped = prepare.normalize(sources.read_rows(file_source(path)), formats.preference, str(path), "drop")
    assert len(kept) == 4 and dropped == Counter({"missing": 1, "duplicate": 1})


def test_nothing_valid_is_an_error(tmp_path: Path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(InputError, match="no valid rows"):
        prepare.normalize(sources.read_rows(file_source(path)), formats.preference, str(path), "drop")


def test_split_is_deterministic_and_keeps_each_prompt_on_one_side():
    examples = [{"prompt": [{"role": "user", "content": f"Q{i % 40}"}], "completion": [i]} for i in range(400)]
    first = prepare.split(examples, 0.25, seed=0)
    assert first == prepare.split(list(examples), 0.25, seed=0)
    assert first != prepare.split(examples, 0.25, seed=1)
    train = {json.dumps(e["prompt"]) for e in first["train"]}
    held = {json.dumps(e["prompt"]) for e in first["eval"]}
    assert not train & held and len(train | held) == 40
    assert 3 <= len(held) <= 20
    tiny = prepare.split(examples[:2], 0.01, seed=0)  # never an empty eval split
    assert len(tiny["eval"]) == 1 and len(tiny["train"]) == 1


def test_statistics_count_rows_and_drops():
    parts = {"train": [{"prompt": [{"role": "user", "content": "a b"}], "completion": [{"role": "assistant", "content": "c d e"}]}], "eval": []}
    stats = prepare.statistics(parts, Counter(duplicate=2), rows_read=3)
    assert stats["rows_read"] == 3 and stats["dropped"] == {"duplicate": 2}
    assert stats["train"]["rows"] == 1 and stats["train"]["completion_words"]["p50"] == 3
