"""Request bodies of both contracts.

Strict types (a string is not a number), ranges checked here so errors name the field.  Unknown
top-level fields are ignored, as OpenAI clients send many optional ones; the OpenAI fields that would
change the answer in a way glmkit cannot honour are refused unless they hold their neutral value.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from glmkit.engine.config import MAX_SEED, MAX_STOP_LENGTH, MAX_STOP_STRINGS
from glmkit.templates import Message


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class Character(BaseModel):
    """CharacterGLM session meta, as in a character card."""

    model_config = ConfigDict(strict=True, extra="forbid")

    bot_name: str = Field(min_length=1)
    user_name: str = Field(min_length=1)
    bot_info: str = ""
    user_info: str = ""
    greeting: str = ""


class LegacyRequest(_Body):
    """``POST /`` as ChatGLM's ``api.py`` takes it."""

    prompt: str
    history: list[tuple[str, str]] | None = None
    max_length: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, ge=0, le=1)
    temperature: float | None = Field(None, ge=0, le=2)
    character: Character | None = None


#: the system message ChatGLM3's tool examples use when the request has none of its own
TOOLS_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"

# OpenAI roles -> the template's roles; tool results are what ChatGLM3 calls an observation
_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "observation",
    "function": "observation",
    "observation": "observation",
}


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str = Field(min_length=1)
    arguments: str = "{}"  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value or "{}")
        except json.JSONDecodeError as exc:
            message = "arguments must be JSON text ({error})"
            raise PydanticCustomError("arguments_json", message, {"error": str(exc)}) from None
        if not isinstance(parsed, dict):
            raise PydanticCustomError("arguments_json", "arguments must be a JSON object")
        return value


class ToolCall(BaseModel):
    """A call an assistant turn made, as OpenAI clients send it back in the history."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionTool(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # the function's schema is the model's business

    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: FunctionTool


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: dict[Literal["name"], str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "function", "observation"]
    content: str
    metadata: str | None = None  # ChatGLM3: the tool an assistant turn called
    tools: list[dict[str, Any]] | None = None  # ChatGLM3: tools offered in the system message
    tool_calls: list[ToolCall] | None = None  # OpenAI: the calls an assistant turn made

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # null (an assistant turn that only called a tool) and lists of text parts are plain text
        if value is None:
            return ""
        if isinstance(value, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in value):
                raise PydanticCustomError("text_only", "only text content parts are supported")
            texts = [part.get("text") for part in value]
            if not all(isinstance(text, str) for text in texts):
                raise PydanticCustomError("text_only", "a text content part needs a string 'text'")
            return "".join(texts)
        return value

    @model_validator(mode="after")
    def _calls_are_the_assistants(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("tool_calls", "only an assistant message carries tool_calls")
        return self

    @model_validator(mode="before")
    @classmethod
    def _calls_may_leave_content_out(cls, data: Any) -> Any:
        # as OpenAI allows (and its client sends back): an assistant turn that only called tools
        calls_only = isinstance(data, dict) and data.get("role") == "assistant" and data.get("tool_calls")
        if calls_only and "content" not in data:
            return {**data, "content": None}
        return data

    def to_template(self) -> list[Message]:
        """The template's messages: one, or for an assistant turn with tool calls its text (if any) and
        one message per call, whose content is a parsed tool call (``{"name", "parameters"}``, the shape
        templates return from ``postprocess``) and whose metadata names the tool, as ChatGLM3 keeps it."""
        message: Message = {"role": _ROLES[self.role], "content": self.content}
        if self.metadata is not None:
            message["metadata"] = self.metadata
        if self.tools is not None:
            message["tools"] = self.tools
        if not self.tool_calls:
            return [message]
        calls: list[Message] = [
            {
                "role": "assistant",
                "metadata": call.function.name,
                "content": {"name": call.function.name, "parameters": json.loads(call.function.arguments or "{}")},
            }
            for call in self.tool_calls
        ]
        return [message, *calls] if self.content else calls


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]

# OpenAI fields glmkit cannot honour, accepted only at their neutral values
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
}


class ChatCompletionRequest(_Body):
    model: str | None = None  # any value: the loaded model answers
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stop: list[StopString] | None = Field(
        None, max_length=MAX_STOP_STRINGS, description="a list of stop strings; a single string is accepted too"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    character: Character | None = None
    n: int | None = None
    logprobs: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | NamedToolChoice | None = Field(
        None, description='"auto" (the default when tools are given), "none", or one function by name'
    )
    response_format: dict[str, Any] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str | list):
            raise PydanticCustomError("stop_type", "stop must be a string or a list of strings")
        return [value] if isinstance(value, str) else value

    @field_validator(*_NEUTRAL)
    @classmethod
    def _neutral(cls, value: Any, info: ValidationInfo) -> Any:
        allowed = _NEUTRAL[info.field_name]
        if value is not None and value not in allowed:
            raise PydanticCustomError(
                "unsupported",
                "{field}={value} is not supported by this server (only {allowed})",
                {"field": info.field_name, "value": repr(value), "allowed": repr(allowed[0])},
            )
        return value

    def offered_tools(self) -> list[dict[str, Any]]:
        """The functions the model may call, as ChatGLM3's system message lists them."""
        if not self.tools or self.tool_choice == "none":
            return []
        functions = [tool.function.model_dump() for tool in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            functions = [function for function in functions if function["name"] == self.tool_choice.function["name"]]
        return functions

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_word(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("none", "auto"):
            raise PydanticCustomError(
                "tool_choice",
                "tool_choice {value!r} is not supported: the model decides whether to call a tool "
                "(use 'auto', 'none' or name one function)",
                {"value": value},
            )
        return value

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {tool.function.name for tool in self.tools or []}
            if self.tool_choice.function.get("name") not in names:
                raise PydanticCustomError("tool_choice", "tool_choice names a function that is not in tools")
        return self

    def template_messages(self) -> list[Message]:
        messages = [part for message in self.messages for part in message.to_template()]
        functions = self.offered_tools()
        if functions:
            # as ChatGLM3's own API server: the tools join the system message, or a system message of their own
            if messages[0]["role"] == "system":
                messages[0] = {**messages[0], "tools": functions}
            else:
                messages.insert(0, {"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": functions})
        return messages


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """What every error response holds, as OpenAI's API sends it."""

    error: ErrorDetail
