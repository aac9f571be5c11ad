"""Loading `pipelines.yaml`: reading it, `--set` overrides, and validation errors that name the file and the
dotted key (the schema itself is `rlhf/pipeline.py`)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from rlhf.errors import InputError
from rlhf.pipeline import Pipeline, PipelinesFile, schema


def _strip(annotation: Any) -> Any:
    """Annotated[X] -> X and Optional[X] -> X."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, UnionType) and type(None) in get_args(annotation):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            annotation = rest[0] if len(rest) == 1 else Union[tuple(rest)]
        else:
            return annotation


def _tagged(model: Any, tag: Any) -> bool:
    """Whether `tag` is the discriminator value of `model` in a tagged union."""
    return isinstance(model, type) and issubclass(model, BaseModel) and any(
        get_origin(f.annotation) is Literal and tag in get_args(f.annotation) for f in model.model_fields.values()
    )


def _key(part: Any) -> str:
    """A key as a message shows it: quoted when it holds a newline or another character that would break the line."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def _one_line(text: str) -> str:
    """Control characters escaped: the CLI shows an error as one line, and a user's key or value may hold a newline."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _walk(loc: tuple) -> tuple[list[str], Any]:
    """Follow an error location through the schema.

    Returns the dotted key as the user wrote it (the union members that pydantic
    inserts into locations are dropped) and the model at its end.
    """
    node: Any = schema()
    shown: list[str] = []
    for part in loc:
        if part == "[key]":  # pydantic's mark of an error in the key just before it: not a key itself
            continue
        node = _strip(node)
        origin = get_origin(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            shown.append(_key(part))
            field = node.model_fields.get(part)
            node = field.annotation if field else None
        elif origin is dict:
            shown.append(_key(part))
            node = get_args(node)[1]
        elif origin in (Union, UnionType):
            # the member pydantic tried: a tag value, or in a union without a tag the member's name
            # ('Lora', 'list[str]', "literal['auto']"); not a key the user wrote either way
            node = next((m for m in get_args(node) if _tagged(m, part) or getattr(m, "__name__", None) == part), None)
        else:
            shown.append(_key(part))
            node = None
    return shown, _strip(node)


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    shown, _ = _walk(tuple(first["loc"]))
    path = ".".join(shown)
    if first["type"] == "extra_forbidden":
        _, parent = _walk(tuple(first["loc"])[:-1])
        allowed = sorted(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        return _one_line(f"{where}: unknown key '{path}'; allowed keys here: {', '.join(allowed)}")
    value = first.get("input")
    shown_value = "" if isinstance(value, dict) else f" (got {_shorten(value)})"
    key = f"'{path}': " if path else ""  # a rule of the whole file, such as `default` naming a pipeline
    return _one_line(f"{where}: {key}{first['msg']}{shown_value}")


def _shorten(value: Any, limit: int = 80) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[: limit - 5]}...{shown[-2:]}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`stages.ppo.iterations=10` -> (['stages','ppo','iterations'], 10)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InputError(f"--set {_shorten(text)}: expected KEY=VALUE, e.g. stages.data.eval_fraction=0.1")
    if not key.isprintable():
        raise InputError(f"--set {_shorten(key)}: a key is printable text, e.g. stages.data.eval_fraction")
    keys = key.split(".")
    if not all(part.strip() for part in keys):  # `stages..sft`: else an unknown key '' deep in the message
        raise InputError(f"--set {_shorten(key)}: an empty key between dots; keys are like stages.data.eval_fraction")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else ": ".join(filter(None, _yaml_problem(exc, raw)))
        raise InputError(f"--set {key}: value {_shorten(raw)} is not valid YAML: {why}") from None
    return keys, value


def apply_overrides(raw: dict, pipeline: str, overrides: list[str]) -> dict:
    """Apply `--set` overrides to one pipeline's raw mapping (keys relative to the pipeline)."""
    if overrides:  # a block shared with other pipelines through a YAML alias changes for this one only
        raw["pipelines"][pipeline] = copy.deepcopy(raw["pipelines"][pipeline])
    for text in overrides:
        keys, value = parse_override(text)
        node = raw["pipelines"][pipeline]
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                dotted = ".".join(keys[: depth + 1])
                raise InputError(f"--set {'.'.join(keys)}: '{dotted}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):
    """PyYAML's safe loader with two rules of YAML 1.2 that its 1.1 lacks; without them a mistake becomes a setting."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node)
        return self.construct_document(node)


# `1e-8` is text in YAML 1.1: pydantic's float fields convert it, but `trainer_args` would hand TRL the string
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _refuse_duplicate_keys(root: yaml.Node) -> None:
    """A key given twice in one mapping: YAML 1.1 loaders keep the last silently, dropping what the user wrote first.

    Checked on the composed nodes, before merge keys (`<<: *block`) add the keys that a mapping may override.
    """
    seen_nodes, todo = set(), [root]
    while todo:  # not recursive: a deep document must not end in RecursionError
        node = todo.pop()
        if id(node) in seen_nodes:  # an alias: the same node again, maybe inside itself
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in first:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"found duplicate key {key.value!r} (first on line {first[key.tag, key.value] + 1})",
                            key.start_mark,
                        )
                    first[key.tag, key.value] = key.start_mark.line
                todo += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            todo += node.value


def _load_yaml(text: str) -> Any:
    # libyaml's parser refuses deep nesting at once; the pure-Python one recurses until RecursionError, slowly
    return yaml.load(text, Loader=_Loader)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[str, str]:
    """Where (`line L, column C`) and why, each one line; PyYAML's own text spans lines and names a `<unicode string>`."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return "", _one_line(str(exc))
    if text[mark.index : mark.index + 1] == "\t":
        problem += " (a tab: YAML indents with spaces)"
    context = f" ({exc.context})" if getattr(exc, "context", None) else ""
    return f"line {mark.line + 1}, column {mark.column + 1}", _one_line(f"{problem}{context}")


def read_yaml(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise InputError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a pipelines file") from None
    except OSError as exc:  # not readable by this user, a name too long, ...
        raise InputError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # Latin-1 or UTF-16 from an editor, or not text at all
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8") from None
    try:
        raw = _load_yaml(text)
    except yaml.YAMLError as exc:
        where, why = _yaml_problem(exc, text)
        raise InputError(f"{path}: {where + ': ' if where else ''}not valid YAML: {why}") from None
    except RecursionError:
        raise InputError(f"{path}: not usable YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping with 'default' and 'pipelines'")
    return raw


def _resolve_paths(model: BaseModel, base: Path) -> None:
    """Relative paths are relative to the directory of the config file.

    Every `Path` field at any depth (data files, the reward model any stage is given), so that a block added
    to the schema follows the rule without being named here.
    """
    for field in type(model).model_fields:
        value = getattr(model, field)
        if isinstance(value, Path) and not value.is_absolute():
            setattr(model, field, (base / value).resolve())
        elif isinstance(value, BaseModel):
            _resolve_paths(value, base)


def _validate(raw: dict, path: Path) -> PipelinesFile:
    try:
        return schema().model_validate(raw)
    except ValidationError as err:
        raise InputError(_format_validation_error(err, str(path))) from None


def load_file(path: Path) -> PipelinesFile:
    parsed = _validate(read_yaml(path), path)
    for name, pipeline in parsed.pipelines.items():
        _resolve_paths(pipeline, path.parent)
        if pipeline.schedule:  # the scheduled runs' overrides must give a valid pipeline too
            try:
                load_pipeline(path, name, pipeline.schedule.overrides)
            except InputError as exc:
                why = str(exc).removeprefix(f"{path}: ")
                raise InputError(f"{path}: pipelines.{name}.schedule.overrides: {why}") from None
    return parsed


def load_pipeline(path: Path, name: str | None, overrides: list[str] = ()) -> tuple[str, Pipeline]:
    """Load one pipeline with overrides applied; validates the whole file first."""
    raw = read_yaml(path)
    pipelines, name = raw.get("pipelines"), name or raw.get("default")
    if not isinstance(pipelines, dict) or not isinstance(name, str):
        _validate(raw, path)  # names the key that is missing or of the wrong kind
        raise InputError(f"{path}: expected 'pipelines' to map names to pipelines and 'default' to name one")
    if name not in pipelines:
        known = ", ".join(sorted(map(str, pipelines)))
        raise InputError(_one_line(f"{path}: no pipeline named {name!r}; defined: {known}"))
    if overrides and not isinstance(pipelines[name], dict):
        _validate(raw, path)  # names pipelines.NAME: not a section that `--set` can reach into
        raise InputError(f"{path}: 'pipelines.{_key(name)}': expected a mapping")
    parsed = _validate(apply_overrides(raw, name, list(overrides)), path)
    pipeline = parsed.pipelines[name]
    _resolve_paths(pipeline, path.parent)
    return name, pipeline
