"""The OpenAPI description: bodies are parsed by hand (any Content-Type, OpenAI-style errors), so the
request models are declared here, for ``/openapi.json``, ``/docs`` and the fuzz tests that read it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from glmkit.serve.schemas import ChatCompletionRequest, ErrorBody, LegacyRequest

_REF = "#/components/schemas/{model}"
_MODELS: list[type[BaseModel]] = [LegacyRequest, ChatCompletionRequest, ErrorBody]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(ErrorBody)}}}


#: the errors every generating route can answer
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("a field is missing, of the wrong type or out of range, or the prompt does not fit"),
    401: _error("the server has an API key and the request did not send it"),
    413: _error("the body is larger than the server's limit"),
    429: _error("the queue is full; retry after the Retry-After header's seconds"),
    503: _error("the server is shutting down or its generation worker has stopped"),
}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads ``model`` from its JSON body."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


def describe_request_bodies(app: FastAPI) -> None:
    """Make ``app.openapi()`` include the request models that ``json_body`` refers to."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, definitions = models_json_schema([(m, "validation") for m in _MODELS], ref_template=_REF)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
