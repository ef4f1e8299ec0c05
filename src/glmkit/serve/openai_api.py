"""OpenAI-compatible ``/v1/chat/completions`` (JSON or SSE) and ``/v1/models``.

Streamed deltas are the engine's raw text; the non-streamed ``content`` is the template's
post-processed reply (for most templates the same text, stripped).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
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


async def _sse(reply: Reply, head: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events: the role, content deltas, the finish reason, then ``[DONE]``."""

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
        body = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        return _event({**body, "usage": None} if include_usage else body)

    yield chunk({"role": "assistant", "content": ""})
    usage: dict[str, int] | None = None
    try:
        async for piece in reply.chunks():
            if piece.text:
                yield chunk({"content": piece.text})
            if piece.finish_reason:
                yield chunk({}, piece.finish_reason)
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
            return StreamingResponse(
                _sse(reply, {**head, "object": "chat.completion.chunk"}, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        completion = await reply.complete()
        response, _ = backend.chat_model.template.postprocess(completion.text, messages)
        # a ChatGLM3 tool call comes back as a dict: its JSON is the content
        content = response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)
        message = {"role": "assistant", "content": content}
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": completion.finish_reason}],
            "usage": _usage(completion.prompt_tokens, completion.completion_tokens),
        }

    return api
