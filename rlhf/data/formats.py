"""Turn raw rows into the conversational shapes TRL trains on, or say what is wrong.

Instruction rows: `prompt`/`completion` (strings or message lists) or `messages`.
Preference rows: `prompt`/`chosen`/`rejected`, or `chosen`/`rejected` alone as
message lists or HH-RLHF text ("\\n\\nHuman: ...\\n\\nAssistant: ..."), whose
shared turns become the prompt.
"""

from __future__ import annotations

import re

Messages = list[dict[str, str]]

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_ROLES = ("system", "user", "assistant")


class RowProblem(Exception):
    """One row is invalid. `reason` is a short code used to count drops."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def instruction(row: dict) -> dict:
    """-> {prompt: messages, completion: [assistant message]}"""
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise RowProblem("wrong_type", "'messages' must end with an assistant turn after at least one other turn")
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    prompt = _prompt(_field(row, "prompt"), "prompt")
    return {"prompt": prompt, "completion": _reply(_field(row, "completion"), "completion")}


def preference(row: dict) -> dict:
    """-> {prompt: messages, chosen: [assistant message], rejected: [assistant message]}"""
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if "prompt" in row:
        pair = {
            "prompt": _prompt(_field(row, "prompt"), "prompt"),
            "chosen": _reply(chosen, "chosen"),
            "rejected": _reply(rejected, "rejected"),
        }
    else:
        pair = _split_shared_prompt(_dialogue(chosen, "chosen"), _dialogue(rejected, "rejected"))
    if pair["chosen"] == pair["rejected"]:
        raise RowProblem("identical", "'chosen' and 'rejected' are identical")
    return pair


def text_of(messages: Messages) -> str:
    return "\n".join(m["content"] for m in messages)


def _field(row: dict, name: str):
    if name not in row or row[name] is None:
        raise RowProblem("missing", f"missing field '{name}'")
    return row[name]


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise RowProblem("wrong_type", f"'{name}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem("empty", f"'{name}' is empty")
    return value.strip()


def _messages(value, name: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise RowProblem("wrong_type" if value else "empty", f"'{name}' must be a non-empty list of messages")
    messages = []
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise RowProblem("wrong_type", f"'{where}' must be an object with a role in {_ROLES}")
        messages.append({"role": message["role"], "content": _text(message.get("content"), f"{where}.content")})
    return messages


def _prompt(value, name: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, name)}]
    return _messages(value, name)


def _reply(value, name: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, name)}]
    messages = _messages(value, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowProblem("wrong_type", f"'{name}' must be one assistant message when 'prompt' is given")
    return messages


def _dialogue(value, name: str) -> Messages:
    """A whole dialogue: HH-RLHF text or a message list."""
    if isinstance(value, str):
        return _parse_hh(value, name)
    return _messages(value, name)


def _parse_hh(text: str, name: str) -> Messages:
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowProblem("wrong_type", f"'{name}' is neither a message list nor HH-RLHF text ('\\n\\nHuman: ...')")
    return [
        {"role": _HH_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]


def _split_shared_prompt(chosen: Messages, rejected: Messages) -> dict:
    for name, dialogue in (("chosen", chosen), ("rejected", rejected)):
        if dialogue[-1]["role"] != "assistant" or len(dialogue) < 2:
            raise RowProblem("wrong_type", f"'{name}' must end with an assistant turn after the prompt")
        if not dialogue[-1]["content"]:
            raise RowProblem("empty", f"the last turn of '{name}' is empty")
    if chosen[:-1] != rejected[:-1]:
        raise RowProblem("no_shared_prompt", "'chosen' and 'rejected' differ before their last assistant turn")
    for message in chosen[:-1]:
        if not message["content"]:
            raise RowProblem("empty", "a prompt turn is empty")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
