"""``POST /``: the contract of ChatGLM's ``api.py``, so existing clients keep working.

Unlike the original, an explicit ``0`` for ``top_p`` or ``temperature`` is honoured (0 = greedy).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request

from glmkit.serve.backend import Backend
from glmkit.serve.errors import parse_body
from glmkit.serve.openapi import ERROR_RESPONSES, json_body
from glmkit.serve.schemas import LegacyRequest


def router(backend: Backend) -> APIRouter:
    api = APIRouter()

    @api.post("/", openapi_extra=json_body(LegacyRequest), responses=ERROR_RESPONSES)
    async def legacy_chat(request: Request) -> dict[str, Any]:
        body = parse_body(LegacyRequest, await request.body())
        history = [list(pair) for pair in body.history or []]
        messages = backend.chat_model.build_messages(body.prompt, history)
        reply = await backend.start(
            request.state,
            messages,
            body.character.model_dump() if body.character else None,
            param="prompt",
            max_length=body.max_length,
            top_p=body.top_p,
            temperature=body.temperature,
        )
        completion = await reply.complete()
        response, _ = backend.chat_model.template.postprocess(completion.text, messages)
        # a ChatGLM3 tool call comes back as a dict; its history entry holds it as JSON text
        shown = response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)
        return {
            "response": response,
            "history": [*history, [body.prompt, shown]],
            "status": 200,
            "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        }

    return api
