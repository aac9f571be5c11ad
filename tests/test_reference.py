"""The README's reference of the keys is the one the schema generates, and every key has a description."""

from pathlib import Path

from rlhf.reference import END, START, markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_key_of_every_block_has_a_description():
    rows = [line for line in markdown().splitlines() if line.startswith("| `")]
    assert len(rows) > 100
    assert [row for row in rows if row.rstrip().endswith("|  |")] == []


def test_the_readme_reference_is_current():
    text = README.read_text()
    assert START in text and END in text
    current = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert current == markdown().strip(), "stale: run `python -m rlhf.reference README.md`"
