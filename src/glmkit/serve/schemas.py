"""Request bodies of both contracts.

Strict types (a string is not a number), ranges checked here so errors name the field.  Unknown
top-level fields are ignored, as OpenAI clients send many optional ones; the OpenAI fields that would
change the answer in a way glmkit cannot honour are refused unless they hold their neutral value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
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


# OpenAI roles -> the template's roles; tool results are what ChatGLM3 calls an observation
_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "observation",
    "function": "observation",
    "observation": "observation",
}


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "function", "observation"]
    content: str
    metadata: str | None = None  # ChatGLM3: the tool an assistant turn called
    tools: list[dict[str, Any]] | None = None  # ChatGLM3: tools offered in the system message

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

    def to_template(self) -> Message:
        message: Message = {"role": _ROLES[self.role], "content": self.content}
        if self.metadata is not None:
            message["metadata"] = self.metadata
        if self.tools is not None:
            message["tools"] = self.tools
        return message


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
    "tools": ([],),
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
    tools: list[Any] | None = None
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

    def template_messages(self) -> list[Message]:
        return [message.to_template() for message in self.messages]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """What every error response holds, as OpenAI's API sends it."""

    error: ErrorDetail
