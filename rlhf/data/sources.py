"""Read raw rows, each with the number a person would look for, from files or the hub."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

from rlhf.blocks import FileSource, HubSource
from rlhf.errors import InputError

Row = tuple[int, dict]


def describe(source: FileSource | HubSource) -> str:
    """Where rows come from, as error messages and MLflow name it."""
    if isinstance(source, FileSource):
        return str(source.path)
    subset = f"/{source.subset}" if source.subset else ""
    return f"hub:{source.name}{subset}[{source.split}]"


def digest(source: FileSource | HubSource) -> str:
    """Content digest of a file source; the name and revision for a hub source."""
    if isinstance(source, FileSource):
        if not source.path.is_file():
            raise InputError(f"{source.path}: data file not found")
        return hashlib.sha256(source.path.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(source.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def read_rows(source: FileSource | HubSource) -> Iterator[Row]:
    if isinstance(source, HubSource):
        yield from _read_hub(source)
        return
    path = source.path
    if not path.is_file():
        raise InputError(f"{path}: data file not found")
    kind = source.format if source.format != "auto" else _format_from_suffix(path)
    reader = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}[kind]
    for number, row in reader(path):
        if not isinstance(row, dict):
            raise InputError(f"{path}: row {number}: expected an object with named fields, got {type(row).__name__}")
        yield number, row


def _format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson"):
        return "jsonl"
    if suffix in ("json", "parquet", "csv"):
        return suffix
    raise InputError(f"{path}: cannot tell the format from the suffix; set 'format' to jsonl, json, parquet or csv")


def _decode(path: Path, data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: {where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        position = f"column {exc.colno}" if exc.lineno == 1 else f"line {exc.lineno} column {exc.colno}"
        raise InputError(f"{where}: not valid JSON: {exc.msg} at {position}") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise InputError(f"{where}: not usable JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _decode(path, raw, f"line {number}").strip()
            if not line:
                continue
            yield number, _parse_json(line, f"{path}: row {number}")


def _read_json(path: Path) -> Iterator[Row]:
    data = _parse_json(_decode(path, path.read_bytes(), "file"), str(path))
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise InputError(f"{path}: expected a list of rows, or an object holding exactly one list")
        data = lists[0]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of rows")
    yield from enumerate(data, start=1)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable parquet file: {exc}") from None
    yield from enumerate(table.to_pylist(), start=1)


def _read_csv(path: Path) -> Iterator[Row]:
    text = _decode(path, path.read_bytes(), "file")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for number, row in enumerate(reader, start=1):
            if None in row:
                raise InputError(f"{path}: row {number}: more values than header columns")
            yield number, {key: value for key, value in row.items() if value != ""}
    except csv.Error as exc:
        raise InputError(f"{path}: row {reader.line_num}: malformed CSV: {exc}") from None


def _read_hub(source: HubSource) -> Iterator[Row]:
    import datasets

    try:
        data = datasets.load_dataset(source.name, source.subset, split=source.split, revision=source.revision)
    except Exception as exc:  # offline, unknown name, bad split: all are input problems here
        raise InputError(f"{describe(source)}: cannot load: {exc}".replace("\n", " ")) from None
    yield from enumerate(data, start=1)
