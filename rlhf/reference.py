"""The reference of every key of `pipelines.yaml`, generated from the schema (types, defaults, descriptions).

`python -m rlhf.reference README.md` rewrites the README's reference between its markers; a test fails
when the two differ, so the reference cannot fall behind the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from rlhf.pipeline import schema

START = "<!-- reference: generated from the schema by `python -m rlhf.reference README.md`; do not edit by hand -->"
END = "<!-- end of reference -->"


def markdown() -> str:
    """One table per block, in the order a reader meets them, each block once."""
    pipeline = get_args(schema().model_fields["pipelines"].annotation)[1]
    stages = pipeline.model_fields["stages"].annotation
    queue: list[tuple[str, type[BaseModel]]] = [("the file", schema()), ("pipelines.NAME", pipeline)]
    queue += [(f"stages.{name}", _models(field.annotation)[0]) for name, field in stages.model_fields.items()]
    done: set[type[BaseModel]] = {stages}
    parts = []
    while queue:
        where, model = queue.pop(0)
        if model in done:
            continue
        done.add(model)
        parts.append(_table(where, model))
        for name, field in model.model_fields.items():
            queue += [(f"{where}.{name}" if model is not schema() else name, m) for m in _models(field.annotation)]
    return "\n".join(parts)


def _table(where: str, model: type[BaseModel]) -> str:
    doc = " ".join((model.__doc__ or "").split("\n\n")[0].split()) if model.__doc__ != BaseModel.__doc__ else ""
    rows = [f"#### `{where}` ({model.__name__})\n", *([doc, ""] if doc else []), "| key | type | default | description |",
            "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else _value(field.get_default(call_default_factory=True))
        rows.append(f"| `{name}` | {_cell(_type(field.annotation))} | {_cell(default)} | {_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in get_args(annotation) for model in _models(argument)]


def _type(annotation: Any) -> str:
    origin, arguments = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type(arguments[0])
    if origin in (Union, UnionType):
        shown = [_type(a) for a in arguments if a is not type(None)]
        return " or ".join(shown + (["null"] if type(None) in arguments else []))
    if origin is Literal:
        return " or ".join(f"`{value}`" for value in arguments)
    if origin is list:
        return f"list of {_type(arguments[0])}"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.__name__
    return getattr(annotation, "__name__", str(annotation))


def _value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write(readme: Path) -> None:
    text = readme.read_text()
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    readme.write_text(f"{before}{START}\n\n{markdown()}\n{END}{after}")


if __name__ == "__main__":
    write(Path(sys.argv[1]))
