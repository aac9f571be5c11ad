"""Judgements in and out of the label store, as plain JSONL or as Label Studio's JSON.

So that judgements collected elsewhere (a Label Studio project, another team's store) train here,
and judgements collected here can be read by anything. The formats:

- JSONL (`.jsonl`): one judgement a line, `{"queue", "prompt" (chat messages), "response_a",
  "response_b", "choice" (A, B, tie, both_bad), "annotator", "comment", "ms", "created_at" (ISO)}`;
  optional `purpose`, `policy_a`, `policy_b`, `gold_choice` carry the rest of the item.
- Label Studio (`.json`): a list of tasks as Label Studio exports them, `data: {prompt, answer1,
  answer2}` and `annotations[].result[]`, made with `LABEL_STUDIO_CONFIG` below. Its Pairwise tag
  can only say left (answer1, our A) or right (answer2, our B), so ties and both-bad are a Choices
  tag `verdict` beside it (values `tie`, `both_bad`; "Tie" and "Both bad" are read too); the comment
  is a TextArea `comment`; `lead_time` (seconds) is `ms`. Skipped (`was_cancelled`) and empty
  annotations are counted, not imported. The annotator is `completed_by`: a name, an
  `{"email"|"username"}` object, or a bare user id read as `label-studio-user-<id>`. Our export adds
  `messages`, `queue`, `purpose`, `policy_a`, `policy_b` and `gold_choice` to `data`, which Label
  Studio keeps and ignores, so a round trip loses nothing.

Importing never half-happens: every row is checked first, and a bad one raises `InputError`
naming the file and the line (JSONL) or task (Label Studio).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from rlhf.errors import InputError
from rlhf.labels.store import MAX_MS, BadJudgement, LabelStore, NewItem, Record, check_item, check_judgement

FORMATS = ("jsonl", "label-studio")

LABEL_STUDIO_CONFIG = """<View>
  <Text name="prompt" value="$prompt"/>
  <Pairwise name="comparison" toName="answer1,answer2"/>
  <Text name="answer1" value="$answer1"/>
  <Text name="answer2" value="$answer2"/>
  <Choices name="verdict" toName="prompt" choice="single">
    <Choice value="tie"/>
    <Choice value="both_bad"/>
  </Choices>
  <TextArea name="comment" toName="prompt" maxSubmissions="1"/>
</View>
"""

REQUIRED = ("queue", "prompt", "response_a", "response_b", "choice", "annotator")
OPTIONAL = ("comment", "ms", "created_at", "purpose", "policy_a", "policy_b", "gold_choice")
SIDES = {"left": "A", "right": "B"}


def file_format(path: Path, fmt: str | None = None) -> str:
    """`fmt` when given, else by suffix: .jsonl is JSONL, .json is Label Studio."""
    if fmt is None:
        fmt = {".jsonl": "jsonl", ".json": "label-studio"}.get(Path(path).suffix.lower())
    if fmt not in FORMATS:
        raise InputError(f"{path}: cannot tell the format; name it .jsonl or .json, or give one of {', '.join(FORMATS)}")
    return fmt


def import_judgements(store: LabelStore, path: Path, fmt: str | None = None, queue: str | None = None) -> dict:
    """Reads `path` into the store; `queue`, when given, replaces the queues the file names.

    Returns the counts: items_created, annotators_created, judgements_created, duplicates_skipped
    (an annotator's second judgement of one item, in the file or already in the store) and
    empty_skipped (Label Studio annotations that were cancelled or chose nothing).
    """
    path = Path(path)
    if file_format(path, fmt) == "jsonl":
        records, empty = _read_jsonl(path, queue), 0
    else:
        records, empty = _read_label_studio(path, queue)
    return store.import_records(records) | {"empty_skipped": empty}


def export_judgements(store: LabelStore, queue: str, path: Path, fmt: str | None = None, purpose: str | None = None) -> int:
    """Writes the queue's judgements (of `purpose`, or all) to `path`; returns how many."""
    path = Path(path)
    rows = store.judgements(queue, purpose=purpose)
    if file_format(path, fmt) == "jsonl":
        text = "".join(json.dumps(_jsonl_row(queue, row), ensure_ascii=False) + "\n" for row in rows)
    else:
        text = json.dumps(_label_studio_tasks(queue, rows), ensure_ascii=False, indent=1)
    path.write_text(text, encoding="utf-8")
    return len(rows)


# ------------------------------------------------------------ JSONL


def _read_jsonl(path: Path, queue: str | None) -> list[Record]:
    records = []
    for number, line in enumerate(_read_text(path).split("\n"), 1):  # not splitlines(): text may hold U+2028 and the like
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object with {', '.join(REQUIRED)}")
        if unknown := sorted(set(row) - set(REQUIRED) - set(OPTIONAL)):
            raise InputError(f"{where}: unknown key {', '.join(unknown)}; keys are {', '.join(REQUIRED + OPTIONAL)}")
        if missing := [key for key in REQUIRED if row.get(key) in (None, "") and not (key == "queue" and queue)]:
            raise InputError(f"{where}: missing {', '.join(missing)}")
        records.append(_record(where, queue or row["queue"], **{key: row[key] for key in row if key != "queue"}))
    return records


def _jsonl_row(queue: str, row: dict) -> dict:
    return {"queue": queue} | {key: row[key] for key in REQUIRED[1:] + OPTIONAL}


# ------------------------------------------------------------ Label Studio


def _read_label_studio(path: Path, queue: str | None) -> tuple[list[Record], int]:
    try:
        tasks = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: line {exc.lineno}: not JSON: {exc.msg}") from None
    if not isinstance(tasks, list):
        raise InputError(f"{path}: expected a list of Label Studio tasks, as Label Studio exports them")
    records, empty = [], 0
    for number, task in enumerate(tasks, 1):
        where = f"{path}: task {number}" + (f" (id {task['id']})" if isinstance(task, dict) and "id" in task else "")
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a task with data: {{prompt, answer1, answer2}}")
        if missing := [key for key in ("answer1", "answer2") if not isinstance(data.get(key), str)]:
            raise InputError(f"{where}: data has no text {', '.join(missing)}")
        if "messages" in data:
            prompt = data["messages"]
        elif isinstance(data.get("prompt"), str):
            prompt = [{"role": "user", "content": data["prompt"]}]
        else:
            raise InputError(f"{where}: data has no text prompt")
        task_queue = queue or data.get("queue")
        if not task_queue:
            raise InputError(f"{where}: no queue in the task; give the queue to import into")
        item = {key: data[key] for key in ("purpose", "policy_a", "policy_b", "gold_choice") if key in data}
        annotations = task.get("annotations", [])
        if not isinstance(annotations, list):
            raise InputError(f"{where}: annotations is not a list")
        for count, annotation in enumerate(annotations, 1):
            here = f"{where}, annotation {count}"
            if not isinstance(annotation, dict) or not isinstance(annotation.get("result"), list):
                raise InputError(f"{here}: expected an object with a result list")
            if annotation.get("was_cancelled"):
                empty += 1
                continue
            choice, comment = _label_studio_result(here, annotation["result"])
            if choice is None:
                empty += 1
                continue
            lead_time = annotation.get("lead_time")
            ms = round(lead_time * 1000) if isinstance(lead_time, (int, float)) and 0 <= lead_time * 1000 <= MAX_MS else None
            records.append(_record(
                here, task_queue, prompt=prompt, response_a=data["answer1"], response_b=data["answer2"], choice=choice,
                annotator=_label_studio_annotator(here, annotation.get("completed_by")), comment=comment, ms=ms,
                created_at=annotation.get("created_at"), **item,
            ))
    return records, empty


def _label_studio_result(where: str, results: list) -> tuple[str | None, str | None]:
    """(choice or None when the annotator chose nothing, comment) from one annotation's results."""
    sides, verdicts, texts = [], [], []
    for result in results:
        value = result.get("value") if isinstance(result, dict) else None
        if not isinstance(value, dict):
            raise InputError(f"{where}: a result without a value object")
        kind = result.get("type")
        if kind == "pairwise":
            if value.get("selected") not in SIDES:
                raise InputError(f"{where}: pairwise selected {value.get('selected')!r}, expected left or right")
            sides.append(SIDES[value["selected"]])
        elif kind == "choices":
            named = (str(c).strip().lower().replace(" ", "_").replace("-", "_") for c in value.get("choices", []))
            verdicts += [c for c in named if c in ("tie", "both_bad")]  # other Choices tags of a project are not ours
        elif kind == "textarea":
            texts += [str(t) for t in value.get("text", [])]
    if len(sides) + len(verdicts) > 1:
        raise InputError(f"{where}: more than one verdict ({', '.join(sides + verdicts)})")
    return (sides + verdicts or [None])[0], "\n".join(texts) or None


def _label_studio_annotator(where: str, completed_by) -> str:
    if isinstance(completed_by, str) and completed_by.strip():
        return completed_by.strip()
    if isinstance(completed_by, dict):
        name = completed_by.get("email") or completed_by.get("username")
        if isinstance(name, str) and name.strip():
            return name.strip()
        completed_by = completed_by.get("id")
    if isinstance(completed_by, int) and not isinstance(completed_by, bool):
        return f"label-studio-user-{completed_by}"
    raise InputError(f"{where}: completed_by names no annotator")


def _label_studio_tasks(queue: str, rows: list[dict]) -> list[dict]:
    tasks: dict[int, dict] = {}
    for row in rows:
        task = tasks.setdefault(row["item_id"], {
            "id": row["item_id"],
            "data": {
                "prompt": _prompt_text(row["prompt"]),
                "answer1": row["response_a"],
                "answer2": row["response_b"],
                "messages": row["prompt"],
                "queue": queue,
                "purpose": row["purpose"],
                "policy_a": row["policy_a"],
                "policy_b": row["policy_b"],
                "gold_choice": row["gold_choice"],
            },
            "annotations": [],
        })
        if row["choice"] in SIDES.values():
            side = next(name for name, choice in SIDES.items() if choice == row["choice"])
            result = [{"type": "pairwise", "from_name": "comparison", "to_name": ["answer1", "answer2"],
                       "value": {"selected": side}}]
        else:
            result = [{"type": "choices", "from_name": "verdict", "to_name": "prompt", "value": {"choices": [row["choice"]]}}]
        if row["comment"]:
            result.append({"type": "textarea", "from_name": "comment", "to_name": "prompt", "value": {"text": [row["comment"]]}})
        task["annotations"].append({
            "id": row["id"],
            "completed_by": {"email": row["annotator"]},
            "created_at": row["created_at"],
            "lead_time": None if row["ms"] is None else row["ms"] / 1000,
            "was_cancelled": False,
            "result": result,
        })
    return list(tasks.values())


def _prompt_text(messages: list[dict]) -> str:
    """What Label Studio shows: the user's text, or every turn when there are several."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{message['role']}: {message['content']}" for message in messages)


# ------------------------------------------------------------ both


def _record(where: str, queue, *, prompt, response_a, response_b, choice, annotator, comment=None, ms=None,
            created_at=None, purpose="train", policy_a=None, policy_b=None, gold_choice=None) -> Record:
    if not isinstance(queue, str) or not queue:
        raise InputError(f"{where}: queue is a name, not {queue!r}")
    if not isinstance(annotator, str) or not annotator.strip() or len(annotator) > 200:
        raise InputError(f"{where}: annotator is a name of 1 to 200 characters, not {annotator!r}")
    if isinstance(ms, float) and ms.is_integer():
        ms = int(ms)
    record = Record(
        queue=queue, prompt=prompt, response_a=response_a, response_b=response_b, choice=choice,
        annotator=annotator.strip(), comment=comment, ms=ms, created_at=_moment(where, created_at),
        purpose=purpose, policy_a={} if policy_a is None else policy_a, policy_b={} if policy_b is None else policy_b,
        gold_choice=gold_choice,
    )
    try:
        check_judgement(record.choice, record.comment, record.ms)
        check_item(NewItem(record.prompt, record.response_a, record.response_b, record.policy_a, record.policy_b,
                           record.purpose, record.gold_choice))
    except (BadJudgement, ValueError) as exc:
        raise InputError(f"{where}: {exc}") from None
    return record


def _moment(where: str, text) -> datetime | None:
    """An ISO time; one without a zone is read as UTC, as the store writes them."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise InputError(f"{where}: created_at {text!r} is not an ISO date and time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read it: {exc.strerror or exc}") from None

