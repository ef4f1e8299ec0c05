"""ChatGLM3-6B prompt: ``[gMASK] sop``, then per message ``<|role|>`` + ``"{metadata}\\n"`` + content,
then ``<|assistant|>``; replies may hold several assistant turns, a tool name line and a tool call.

Tool calls are read as ``tool_call(name=value, ...)`` with :mod:`ast` and literal values only, never
evaluated; a call that does not parse that way is returned as plain text.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from glmkit.errors import GlmkitError
from glmkit.templates.base import Message
from glmkit.templates.chatglm import no_character

ROLES = ("system", "user", "assistant", "observation")


def _command(tokenizer: Any, name: str) -> int:
    try:
        return tokenizer.get_command(name)
    except (AttributeError, KeyError) as exc:
        raise GlmkitError(
            f"the chatglm3 template needs a ChatGLM3 tokenizer with role tokens ({name} is missing); "
            "for a ChatGLM2 checkpoint use the chatglm2 template"
        ) from exc


def format_tool_call(parameters: dict[str, Any]) -> str | None:
    """A parsed tool call's arguments as the model writes the call (``parse_tool_call``'s inverse); None
    when a key cannot be a Python keyword argument."""
    if not all(isinstance(key, str) and key.isidentifier() for key in parameters):
        return None
    arguments = ", ".join(f"{key}={value!r}" for key, value in parameters.items())
    return f"```python\ntool_call({arguments})\n```"


def build_single_message(tokenizer: Any, role: str, metadata: str, content: str | dict) -> list[int]:
    """Ids of one message: the role token, the metadata line, the content (no [gMASK] sop).

    A dict content (a tool call as ``postprocess`` returned it, kept in a message history) goes in as the
    model wrote it when it is ``{"name", "parameters"}``, else as JSON.
    """
    if role not in ROLES:
        raise GlmkitError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    if isinstance(content, dict):
        parameters = content.get("parameters")
        written = format_tool_call(parameters) if isinstance(parameters, dict) else None
        content = written if written is not None else json.dumps(content, ensure_ascii=False)
    return [
        _command(tokenizer, f"<|{role}|>"),
        *tokenizer.encode(f"{metadata}\n", add_special_tokens=False),
        *tokenizer.encode(content, add_special_tokens=False),
    ]


def _message_ids(tokenizer: Any, message: Message) -> list[int]:
    """One history message as the prompt holds it; a system message's tools follow its text as JSON."""
    content = message["content"]
    if message["role"] == "system" and "tools" in message:
        content += "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
    return build_single_message(tokenizer, message["role"], message.get("metadata", ""), content)


def parse_tool_call(code: str) -> dict[str, Any] | None:
    """Keyword arguments of ``tool_call(a=1, b="x")`` when every value is a Python literal, else None."""
    try:
        call = ast.parse(code.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "tool_call"
        and not call.args
        and all(keyword.arg for keyword in call.keywords)  # no **kwargs
    ):
        return None
    try:
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None


class ChatGLM3Template:
    """The ChatGLM3 format; GLM-4's (``templates/glm4.py``) changes the hooks marked below."""

    name = "chatglm3"
    skip_special_tokens = False  # <|assistant|> inside a reply separates turns in postprocess

    # -- hooks: what GLM-4 renders differently --------------------------------------------------------
    def special_id(self, tokenizer: Any, name: str) -> int:
        return _command(tokenizer, name)

    def prefix_ids(self, tokenizer: Any) -> list[int]:
        return [_command(tokenizer, "[gMASK]"), _command(tokenizer, "sop")]

    def message_ids(self, tokenizer: Any, message: Message) -> list[int]:
        """One history message: its role token first, then its text."""
        return _message_ids(tokenizer, message)

    def end_id(self, tokenizer: Any) -> int:
        """The token a training conversation ends with after its last message."""
        return tokenizer.eos_token_id

    def parse_call(self, content: str) -> dict[str, Any] | None:
        """A tool call's parameters from its text (``tool_call(...)`` in a fenced block), or None."""
        return parse_tool_call("\n".join(content.split("\n")[1:-1]))

    # -- the template --------------------------------------------------------------------------------
    def build_input_ids(
        self, tokenizer: Any, messages: list[Message], character: dict[str, str] | None = None
    ) -> list[int]:
        no_character(character)
        if not messages or messages[-1]["role"] not in ("user", "observation"):
            raise GlmkitError(f"the {self.name} template needs messages that end with a user or observation message")
        ids = self.prefix_ids(tokenizer)
        for message in messages:
            ids += self.message_ids(tokenizer, message)
        ids.append(self.special_id(tokenizer, "<|assistant|>"))
        return ids

    def render_conversation(
        self, tokenizer: Any, messages: list[Message], character: dict[str, str] | None = None
    ) -> list[tuple[list[int], bool]]:
        """A whole conversation as ``(ids, trained)`` segments, laid out as ChatGLM3's finetune_demo does.

        An assistant message is trained after its role token (its metadata line and content) and so is
        the token that ends it: the next message's role token or the final eos, the ids chat stops at.
        System, user and observation messages are not trained.  The ids up to an assistant role token
        are ``build_input_ids`` of the messages before it.
        """
        no_character(character)
        segments = [(self.prefix_ids(tokenizer), False)]
        after_reply = False
        for message in messages:
            ids = self.message_ids(tokenizer, message)
            if not ids:  # a message the format leaves out (GLM-4: empty content)
                continue
            segments += [(ids[:1], after_reply), (ids[1:], message["role"] == "assistant")]
            after_reply = message["role"] == "assistant"
        segments.append(([self.end_id(tokenizer)], after_reply))
        return segments

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [
            tokenizer.eos_token_id,
            self.special_id(tokenizer, "<|user|>"),
            self.special_id(tokenizer, "<|observation|>"),
        ]

    def postprocess(self, text: str, messages: list[Message]) -> tuple[Any, list[Message]]:
        """The last turn's reply (text, or a dict for a tool or code-interpreter call) and every
        assistant turn as a history message, as the reference returns them."""
        tools_offered = bool(messages) and messages[0]["role"] == "system" and "tools" in messages[0]
        response: Any = ""
        new: list[Message] = []
        for turn in text.split("<|assistant|>"):
            # The first line of a turn is its metadata: empty for a plain reply, else a tool name.
            metadata, content = turn.split("\n", 1) if "\n" in turn else ("", turn)
            if not metadata.strip():
                content = content.strip()
                new.append({"role": "assistant", "metadata": metadata, "content": content})
                response = content.replace("[[训练时间]]", "2023年")
                continue
            new.append({"role": "assistant", "metadata": metadata, "content": content})
            if not tools_offered:
                response = {"name": metadata.strip(), "content": content}
                continue
            parameters = self.parse_call(content)
            response = content.strip() if parameters is None else {"name": metadata.strip(), "parameters": parameters}
        return response, new


TEMPLATE = ChatGLM3Template()
