"""Turn raw rows into the conversational shapes TRL trains on, or say what is wrong.

Instruction rows: `prompt`/`completion` (strings or message lists) or `messages`.
Prompt rows: `prompt` (a string or a message list).
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
    """-> {prompt: messages, chosen: messages, rejected: messages}; replies start with the assistant."""
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if "prompt" in row:
        pair = {
            "prompt": _prompt(_field(row, "prompt"), "prompt"),
            "chosen": _reply(chosen, "chosen"),
            "rejected": _reply(rejected, "rejected"),
        }
    else:
        pair = _split_shared_prompt(_dialogue(chosen, "chosen"), _dialogue(rejected, "rejected"))
    for name in ("prompt", "chosen", "rejected"):
        if any(not m["content"].strip() for m in pair[name]):
            raise RowProblem("empty", f"a turn of '{name}' is empty")
    if pair["chosen"] == pair["rejected"]:
        raise RowProblem("identical", "'chosen' and 'rejected' are identical")
    return pair


def prompt_only(row: dict) -> dict:
    """-> {prompt: messages}: a prompt for PPO and evaluation, with no reply."""
    return {"prompt": _prompt(_field(row, "prompt"), "prompt")}


CONVERTERS = {"instructions": instruction, "preferences": preference, "prompts": prompt_only}  # per data-stage source


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
    return value


def _messages(value, name: str) -> Messages:
    if not isinstance(value, list):
        raise RowProblem("wrong_type", f"'{name}' must be text or a list of messages, got {type(value).__name__}")
    if not value:
        raise RowProblem("empty", f"'{name}' is an empty list of messages")
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
    if messages[0]["role"] != "assistant":
        raise RowProblem("wrong_type", f"'{name}' must start with an assistant turn when 'prompt' is given")
    return messages


def _dialogue(value, name: str) -> Messages:
    """A whole dialogue: HH-RLHF text or a message list."""
    if isinstance(value, str):
        return _parse_hh(value, name)
    return _messages(value, name)


def _parse_hh(text: str, name: str) -> Messages:
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0]:
        raise RowProblem("wrong_type", f"'{name}' is neither a message list nor HH-RLHF text ('\\n\\nHuman: ...')")
    # Drop only the space after "Human:", so the turns rebuild the text exactly.
    return [
        {"role": _HH_ROLES[role], "content": content[1:] if content.startswith(" ") else content}
        for role, content in zip(parts[1::2], parts[2::2])
    ]


def _split_shared_prompt(chosen: Messages, rejected: Messages) -> dict:
    """The prompt is the longest shared opening that both replies continue with an assistant turn.

    HH-RLHF replies are sometimes several turns long; they stay whole, so
    prompt + reply rebuilds each original dialogue.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for cut in range(shared, 0, -1):
        if cut < len(chosen) and cut < len(rejected) and chosen[cut]["role"] == rejected[cut]["role"] == "assistant":
            return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    raise RowProblem("no_shared_prompt", "'chosen' and 'rejected' share no prompt that both answer as the assistant")
