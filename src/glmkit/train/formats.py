"""The data formats glmkit reads, one normalizer each: a row in, chat messages (and a character card) out.

Every format becomes the same shape: ``{"role", "content"}`` messages (roles system, user, assistant,
observation; ChatGLM3's ``metadata`` tool name and a system message's ``tools`` kept) that end with the
assistant reply to learn.  A row that does not fit raises :class:`BadRow` with the reason; the loader
adds FILE:LINE.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from glmkit.errors import GlmkitError
from glmkit.templates import Message
from glmkit.templates.characterglm import REQUIRED_FIELDS, check_card

FORMATS = ("alpaca", "columns", "messages", "sharegpt", "characterglm")
# prompt/response column pairs recognised without --prompt-column/--response-column (ADGEN is the first)
KNOWN_COLUMNS = (("content", "summary"), ("prompt", "response"), ("query", "response"), ("question", "answer"))
ROLES = ("system", "user", "assistant", "observation")
# ShareGPT speaker names (LLaMA-Factory's and the original ShareGPT's) -> roles
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
    "observation": "observation",
    "tool": "observation",
    "function_call": "function_call",
}
# ChatGLM3's tool-calling system prompt (its finetune_demo puts it in front of the tool list)
TOOLS_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


class BadRow(GlmkitError):
    """A row that cannot become a training example; the message says why."""


def detect_format(row: Any, prompt_column: str | None = None) -> str:
    """The format of a row from its keys."""
    if not isinstance(row, dict):
        raise BadRow(f"a row must be a JSON object, not {type(row).__name__}")
    if prompt_column:
        return "columns"
    if "character" in row or all(key in row for key in REQUIRED_FIELDS):
        return "characterglm"
    turns = row.get("messages", row.get("conversations"))
    if isinstance(turns, list):
        return "sharegpt" if _speaker_turns(turns) else "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if any(prompt in row and response in row for prompt, response in KNOWN_COLUMNS):
        return "columns"
    raise BadRow(
        f"cannot tell the format from the keys {sorted(row)}: pass --format ({', '.join(FORMATS)}) or name the "
        "columns with --prompt-column and --response-column"
    )


def known_columns(row: Any, columns: dict[str, str | None]) -> dict[str, str | None]:
    """``columns`` with the prompt/response pair filled in from the row's keys when none was named, so
    every row of a file is read with the pair its first row showed."""
    if (columns.get("prompt") and columns.get("response")) or not isinstance(row, dict):
        return columns
    found = next(((p, r) for p, r in KNOWN_COLUMNS if p in row and r in row), None)
    return {**columns, "prompt": found[0], "response": found[1]} if found else columns


def normalize(row: Any, fmt: str, columns: dict[str, str | None]) -> tuple[list[Message], dict[str, str] | None]:
    """``(messages, character card or None)`` from one row of format ``fmt``; ``columns`` holds the
    ``prompt``/``response``/``history``/``system`` column names of the column format."""
    if not isinstance(row, dict):
        raise BadRow(f"a row must be a JSON object, not {type(row).__name__}")
    if fmt == "characterglm":
        messages, card = _turns(row), _row_card(row)
    else:
        messages, card = NORMALIZERS[fmt](row, columns), None
    _check(messages)
    return messages, card


def _text(row: dict[str, Any], key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise BadRow(f"missing column {key!r} (the row has {sorted(row)})")
        return ""
    if not isinstance(row[key], str):
        raise BadRow(f"column {key!r} must be a string, not {type(row[key]).__name__}")
    return row[key]


def _pairs(value: Any, key: str) -> list[Message]:
    """A ``[[query, response], ...]`` history (a JSON string in CSV files) as messages."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise BadRow(f"column {key!r} is not a JSON list of [query, response] pairs: {exc.msg}") from None
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair) for pair in value
    ):
        raise BadRow(f"column {key!r} must be a list of [query, response] string pairs")
    roles = ("user", "assistant")
    return [{"role": role, "content": text} for pair in value for role, text in zip(roles, pair, strict=True)]


def _system(text: str) -> list[Message]:
    return [{"role": "system", "content": text}] if text else []


def _columns(row: dict[str, Any], columns: dict[str, str | None]) -> list[Message]:
    prompt, response = columns.get("prompt"), columns.get("response")
    if not prompt or not response:
        raise BadRow(f"name the prompt and response columns (--prompt-column, --response-column); keys: {sorted(row)}")
    history = columns.get("history")
    system = columns.get("system")
    return [
        *_system(_text(row, system, required=False) if system else ""),
        *(_pairs(row.get(history), history) if history else []),
        {"role": "user", "content": _text(row, prompt)},
        {"role": "assistant", "content": _text(row, response)},
    ]


def _alpaca(row: dict[str, Any], columns: dict[str, str | None]) -> list[Message]:
    instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
    # Alpaca's own prompt joins an instruction and its input with a line break
    query = f"{instruction}\n{extra}" if instruction and extra else instruction or extra
    return [
        *_system(_text(row, "system", required=False)),
        *_pairs(row.get("history"), "history"),
        {"role": "user", "content": query},
        {"role": "assistant", "content": _text(row, "output")},
    ]


def _content(turn: dict[str, Any], key: str, index: int) -> str:
    content = turn.get(key)
    if isinstance(content, dict | list):  # a tool result or call given as JSON
        return json.dumps(content, ensure_ascii=False)
    if not isinstance(content, str):
        raise BadRow(f"turn {index} needs a string {key!r}")
    return content


def _with_tools(messages: list[Message], tools: Any) -> list[Message]:
    """A row-level ``tools`` list goes on the system message, where the ChatGLM3 template reads it."""
    if tools in (None, "", []):
        return messages
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise BadRow("'tools' is not valid JSON") from None
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "tools": tools}, *messages[1:]]
    return [{"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": tools}, *messages]


def _messages(row: dict[str, Any], columns: dict[str, str | None] | None = None) -> list[Message]:
    turns = row.get("messages", row.get("conversations"))
    if not isinstance(turns, list) or not turns:
        raise BadRow("'messages' must be a non-empty list of {role, content} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {i} must be an object with role and content")
        role = "observation" if turn.get("role") == "tool" else turn.get("role")
        if role not in ROLES:
            raise BadRow(f"turn {i} has role {turn.get('role')!r}: use one of {', '.join(ROLES)} (or tool)")
        message = {"role": role, "content": _content(turn, "content", i)}
        message.update({key: turn[key] for key in ("metadata", "tools") if key in turn})
        messages.append(message)
    return _with_tools(messages, row.get("tools"))


def _tool_call(value: str) -> Message:
    """A ShareGPT ``function_call`` turn (``{"name", "arguments"}`` JSON) as ChatGLM3 writes a tool call:
    the tool name as metadata and a fenced ``tool_call(...)``."""
    try:
        call = json.loads(value)
        name, arguments = call["name"], call.get("arguments", {})
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        code = "tool_call(" + ", ".join(f"{key}={argument!r}" for key, argument in arguments.items()) + ")"
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return {"role": "assistant", "content": value}
    return {"role": "assistant", "metadata": str(name), "content": f"```python\n{code}\n```"}


def _sharegpt(row: dict[str, Any], columns: dict[str, str | None] | None = None) -> list[Message]:
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise BadRow("'conversations' must be a non-empty list of {from, value} objects")
    messages = _system(row["system"]) if isinstance(row.get("system"), str) else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {i} must be an object with from and value")
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise BadRow(f"turn {i} is from {turn.get('from')!r}: use one of {', '.join(SHAREGPT_ROLES)}")
        value = _content(turn, "value", i)
        messages.append(_tool_call(value) if role == "function_call" else {"role": role, "content": value})
    return _with_tools(messages, row.get("tools"))


def _speaker_turns(turns: list[Any]) -> bool:
    """Whether turns are ShareGPT's ``{"from", "value"}`` rather than ``{"role", "content"}``."""
    first = next((turn for turn in turns if isinstance(turn, dict)), {})
    return "from" in first or "value" in first


def _turns(row: dict[str, Any]) -> list[Message]:
    turns = row.get("messages", row.get("conversations"))
    return (_sharegpt if isinstance(turns, list) and _speaker_turns(turns) else _messages)(row)


def _row_card(row: dict[str, Any]) -> dict[str, str]:
    """A CharacterGLM card from a row: a ``character`` object, or the card fields on the row itself."""
    return check_card(row.get("character", row), "the row's character card")


def _check(messages: list[Message]) -> None:
    roles = [message["role"] for message in messages]
    if "system" in roles[1:]:
        raise BadRow("a system message may only come first")
    if roles[-1] != "assistant":
        raise BadRow(f"the last turn must be the assistant reply to learn, not {roles[-1]!r}")
    for message in messages:
        if message["role"] == "assistant" and not message["content"].strip():
            raise BadRow("empty response: an assistant reply has no text")


NORMALIZERS: dict[str, Callable[[dict[str, Any], dict[str, str | None]], list[Message]]] = {
    "alpaca": _alpaca,
    "columns": _columns,
    "messages": _messages,
    "sharegpt": _sharegpt,
}
