"""GLM-4-9B-chat prompt, as its official chat template renders it: ``[gMASK]<sop>``, then per message
``<|role|>{metadata}\\n{content}``, then ``<|assistant|>``.

- A message with empty content is left out, as the official template does.
- A message with ``tools`` (the system message) is preceded by a ``<|system|>`` block that names the
  assistant and lists each function as JSON (4-space indent, non-ASCII kept), after ``# 可用工具``.
- A tool call is an assistant turn whose metadata is the function name and whose content is the
  arguments as JSON; the result comes back as an ``observation`` message.

Everything else is ChatGLM3's (``templates/chatglm3.py``): turns split at ``<|assistant|>``, the same
reply clean-up, and tool calls returned as ``{"name", "parameters"}``, parsed with :mod:`json` only.
It works with glmkit's tiktoken tokenizer and with the ``tokenizer.json`` of ``-hf`` checkpoints.
"""

from __future__ import annotations

import json
from typing import Any

from glmkit.errors import GlmkitError
from glmkit.templates.base import Message
from glmkit.templates.chatglm3 import ROLES, ChatGLM3Template

TOOLS_SYSTEM_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。"
)
TOOLS_HEADING = "# 可用工具"
FUNCTION_FOOTER = "在调用上述函数时，请使用 Json 格式表示调用的参数。"


def _function(tool: Any) -> dict[str, Any]:
    """The function description of a tool: OpenAI's ``{"type": "function", "function": {...}}`` or, as
    ChatGLM3 takes them, the bare ``{"name", "description", "parameters"}``."""
    if isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        function = tool["function"]
    elif isinstance(tool, dict) and "type" not in tool:
        function = tool
    else:
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise GlmkitError(f"the glm4 template renders function tools only, not {kind!r}")
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise GlmkitError("a tool's function needs a name")
    return function


def tools_block(tools: Any) -> str:
    """The text of the system block that lists ``tools`` (after its ``<|system|>`` token)."""
    if not isinstance(tools, list):
        raise GlmkitError(f"tools must be a list, not {type(tools).__name__}")
    text = f"\n{TOOLS_SYSTEM_PROMPT}\n\n{TOOLS_HEADING}"
    for function in map(_function, tools):
        text += f"\n\n## {function['name']}\n\n{json.dumps(function, ensure_ascii=False, indent=4)}\n{FUNCTION_FOOTER}"
    return text


class Glm4Template(ChatGLM3Template):
    name = "glm4"

    def special_id(self, tokenizer: Any, name: str) -> int:
        # glmkit's GLM-4 tokenizer and transformers' fast tokenizer (-hf checkpoints) both name them
        index = tokenizer.convert_tokens_to_ids(name)
        if not isinstance(index, int) or index == getattr(tokenizer, "unk_token_id", None):
            raise GlmkitError(f"the glm4 template needs a GLM-4 tokenizer ({name} is missing)")
        return index

    def _text(self, tokenizer: Any, text: str) -> list[int]:
        # user and model text never becomes a control token, whatever it spells
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def prefix_ids(self, tokenizer: Any) -> list[int]:
        return [self.special_id(tokenizer, "[gMASK]"), self.special_id(tokenizer, "<sop>")]

    def message_ids(self, tokenizer: Any, message: Message) -> list[int]:
        role = message["role"]
        if role not in ROLES:
            raise GlmkitError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        ids = []
        if "tools" in message:
            ids += [self.special_id(tokenizer, "<|system|>"), *self._text(tokenizer, tools_block(message["tools"]))]
        content = message["content"]
        if isinstance(content, dict):  # a tool call as postprocess returned it, kept in a history
            content = json.dumps(content, ensure_ascii=False)
        if content:
            text = f"{message.get('metadata') or ''}\n{content}"
            ids += [self.special_id(tokenizer, f"<|{role}|>"), *self._text(tokenizer, text)]
        return ids

    def end_id(self, tokenizer: Any) -> int:
        # GLM-4's finetune_demo ends every conversation with <|user|>, one of the ids chat stops at
        return self.special_id(tokenizer, "<|user|>")

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        return [self.special_id(tokenizer, name) for name in ("<|endoftext|>", "<|user|>", "<|observation|>")]

    def parse_call(self, content: str) -> dict[str, Any] | None:
        """The arguments of a call: a JSON object (GLM-4 writes ``name\\n{...}``), else None."""
        try:
            parameters = json.loads(content)
        except (json.JSONDecodeError, RecursionError):
            return None
        return parameters if isinstance(parameters, dict) else None


TEMPLATE = Glm4Template()
