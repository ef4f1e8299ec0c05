"""OpenAI-compatible ``/v1/chat/completions`` (JSON or SSE) and ``/v1/models``.

Streamed deltas are the engine's raw text; the non-streamed ``content`` is the template's
post-processed reply (for most templates the same text, stripped).  A reply that the template parses
as a tool call (``{"name", "parameters"}``, as ChatGLM3's does) goes out as ``tool_calls`` with
``finish_reason: "tool_calls"``; with tools offered, a stream holds the reply back until it is whole,
since only then is it known to be a call or text.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from glmkit.engine.scheduler import SchedulerClosed
from glmkit.serve.backend import Backend, Reply
from glmkit.serve.errors import APIError, parse_body
from glmkit.serve.openapi import ERROR_RESPONSES, json_body
from glmkit.serve.schemas import ChatCompletionRequest

log = logging.getLogger("glmkit.serve")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _event(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def assistant_message(response: Any, finish_reason: str) -> tuple[dict[str, Any], str]:
    """The OpenAI message for a template's post-processed response, and the finish reason: a parsed
    tool call becomes ``tool_calls``; any other dict (a ChatGLM3 code-interpreter turn) is JSON content."""
    if isinstance(response, dict) and isinstance(response.get("parameters"), dict) and response.get("name"):
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": response["name"], "arguments": json.dumps(response["parameters"], ensure_ascii=False)},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    content = response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)
    return {"role": "assistant", "content": content}, finish_reason


async def _sse(
    reply: Reply, head: dict[str, Any], include_usage: bool, hold: Callable[[str, str], tuple[dict, str]] | None
) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events: the role, content deltas, the finish reason, then ``[DONE]``.
    ``hold``: the reply is sent whole at its end, as ``hold(text, finish_reason)`` makes it a message."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        return _event({**body, "usage": None} if include_usage else body)

    yield chunk({"role": "assistant", "content": ""})
    usage: dict[str, int] | None = None
    held: list[str] = []
    try:
        async for piece in reply.chunks():
            if piece.text and hold is None:
                yield chunk({"content": piece.text})
            held.append(piece.text)
            if piece.finish_reason:
                finish_reason = piece.finish_reason
                if hold is not None:
                    message, finish_reason = hold("".join(held), finish_reason)
                    delta = {key: value for key, value in message.items() if key != "role" and value is not None}
                    if "tool_calls" in delta:
                        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
                    yield chunk(delta)
                yield chunk({}, finish_reason)
                usage = _usage(piece.prompt_tokens, piece.completion_tokens)
    # the 200 is already sent: an error is told in the stream, which still ends properly
    except SchedulerClosed as exc:  # the server is stopping and the grace period is over
        log.warning("stream cut: %s", exc)
        yield _event(APIError(503, str(exc), type="server_error", code="unavailable").body())
        yield _event("[DONE]")
        return
    except Exception as exc:
        log.error("generation failed mid-stream", exc_info=exc)
        yield _event(APIError(500, f"generation failed: {exc}", type="server_error").body())
        yield _event("[DONE]")
        return
    if include_usage:
        yield _event({**head, "choices": [], "usage": usage})
    yield _event("[DONE]")


def router(backend: Backend) -> APIRouter:
    api = APIRouter(prefix="/v1")
    created = int(time.time())

    @api.get("/models")
    async def list_models() -> dict[str, Any]:
        model = {"id": backend.chat_model.name, "object": "model", "created": created, "owned_by": "glmkit"}
        return {"object": "list", "data": [model]}

    @api.post(
        "/chat/completions",
        response_model=None,
        openapi_extra=json_body(ChatCompletionRequest),
        responses=ERROR_RESPONSES,
    )
    async def chat_completions(request: Request) -> dict[str, Any] | StreamingResponse:
        body = parse_body(ChatCompletionRequest, await request.body())
        messages = body.template_messages()
        template = backend.chat_model.template

        def to_message(text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
            response, _ = template.postprocess(text, messages)
            return assistant_message(response, finish_reason)

        reply = await backend.start(
            request.state,
            messages,
            body.character.model_dump() if body.character else None,
            temperature=body.temperature,
            top_p=body.top_p,
            max_new_tokens=body.max_completion_tokens or body.max_tokens,
            stop=body.stop,
            seed=body.seed,
        )
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": backend.chat_model.name,
        }
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            hold = to_message if body.offered_tools() else None
            return StreamingResponse(
                _sse(reply, {**head, "object": "chat.completion.chunk"}, include_usage, hold),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        completion = await reply.complete()
        message, finish_reason = to_message(completion.text, completion.finish_reason)
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": _usage(completion.prompt_tokens, completion.completion_tokens),
        }

    return api
