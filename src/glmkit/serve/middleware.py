"""Plain ASGI middleware (no ``BaseHTTPMiddleware``, which gets in the way of streaming and cancellation):
the access log, the API key, the body size limit, stopping work for clients that went away, one
OpenAI-style 500 (logged once) for anything unexpected, and for the web page a body limit that streams
and its login in front of every route."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmkit.serve.errors import APIError

access_log = logging.getLogger("glmkit.access")
log = logging.getLogger("glmkit.serve")
CLIENT_GONE = 499  # logged, never sent: nginx's code for "the client closed the request"
# a refused body is read and dropped up to this size, so the client gets the 413 rather than a reset
# connection; past it the connection is closed (nobody is owed an unbounded read)
DRAIN_LIMIT_BYTES = 64 << 20
# what a page loads for itself (scripts, styles, fonts, icons): dozens per page view, no line each
ASSET_SUFFIXES = (".js", ".mjs", ".css", ".map", ".svg", ".png", ".jpg", ".ico", ".woff", ".woff2", ".ttf")


def _under(path: str, prefixes: Sequence[str]) -> bool:
    return any(path == prefix or path.startswith(prefix.rstrip("/") + "/") for prefix in prefixes)


async def _reject(scope: Scope, receive: Receive, send: Send, error: APIError) -> None:
    await error.response()(scope, receive, send)


def is_asset(path: str) -> bool:
    return path.rsplit("/", 1)[-1].lower().endswith(ASSET_SUFFIXES)


class AccessLog:
    """One line per request: client, method, path, status, tokens, duration (prompts only if asked);
    a static asset served without error gets none."""

    def __init__(self, app: ASGIApp, log_prompts: bool = False) -> None:
        self.app = app
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # handlers note usage/prompt in request.state
        started = time.perf_counter()
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except BaseException:
            status = status or 500
            raise
        finally:
            if state.get("client_gone"):
                status = CLIENT_GONE
            if not (is_asset(scope["path"]) and status < 400):
                self._log(scope, state, status, time.perf_counter() - started)

    def _log(self, scope: Scope, state: dict, status: int, seconds: float) -> None:
        client = scope.get("client") or ("-", 0)
        usage = state.get("usage")
        line = '%s:%s "%s %s" %d tokens=%s %.3fs'
        tokens = f"{usage[0]}+{usage[1]}" if usage else "-"
        args = [*client, scope["method"], scope["path"], status, tokens, seconds]
        if self.log_prompts and "prompt" in state:
            line += " prompt=%s"
            args.append(json.dumps(state["prompt"], ensure_ascii=False))
        access_log.info(line, *args)


class InternalErrors:
    """An unexpected exception becomes one logged line and, when nothing was sent yet, a 500 in the
    OpenAI error shape.  Starlette's own handler would log it a second time and re-raise it to uvicorn."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            log.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
            if not started:
                await _reject(scope, receive, send, APIError(500, "internal server error", type="server_error"))


class BearerAuth:
    """``Authorization: Bearer KEY`` on every path but the open ones (``open_paths`` and what is under
    them; ``open_pages`` for GET alone, exactly), compared in constant time."""

    def __init__(
        self, app: ASGIApp, api_key: str, open_paths: Sequence[str] = (), open_pages: Sequence[str] = ()
    ) -> None:
        self.app = app
        self.key = api_key.encode()
        self.open_paths = tuple(open_paths)
        self.open_pages = tuple(open_pages)

    def _open(self, scope: Scope) -> bool:
        if _under(scope["path"], self.open_paths):
            return True
        return scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"] in self.open_pages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._open(scope):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            error = APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await _reject(scope, receive, send, error)


class RequestBody:
    """Read the whole body first (413 past ``max_bytes``), then run the app while watching the
    connection: when the client goes away before the response is complete, the app is cancelled, so
    its generation stops at once (and a queued one never starts), whatever the ASGI server does."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: Sequence[str] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = tuple(exempt)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, received: int, more: bool) -> None:
        """413, after reading what is left of the body while it stays within the drain limit."""
        while more and received <= DRAIN_LIMIT_BYTES:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            received += len(message.get("body", b""))
            more = bool(message.get("more_body"))
        error = APIError(
            413,
            f"the request body is larger than {self.max_bytes} bytes",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        await _reject(scope, receive, send, error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _under(scope["path"], self.exempt):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            # a body declared past the drain limit is not read at all
            await self._refuse(scope, receive, send, 0, int(declared) <= DRAIN_LIMIT_BYTES)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send, len(body), bool(message.get("more_body")))
                return
            if not message.get("more_body"):
                break
        await self._run(scope, bytes(body), receive, send)

    async def _run(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()
        delivered = complete = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def sending(message: Message) -> None:
            nonlocal complete
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        app = asyncio.ensure_future(self.app(scope, replay, sending))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({app, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not app.done():
                gone.set()
                if not complete:  # (after a complete response the server reports a disconnect too)
                    scope.setdefault("state", {})["client_gone"] = True
                    app.cancel()
                await asyncio.wait({app})
            if not app.cancelled():
                app.result()  # re-raise what the app raised
        finally:
            watcher.cancel()
            app.cancel()


class BodyLimit:
    """413 past ``max_bytes`` under ``paths``, without holding the body back: a declared Content-Length
    is refused at once, a streamed body as soon as it passes the limit (the app then sees the client
    leave, and what it answers is dropped).  For routes that must read as the body arrives and answer
    while the connection stays open, such as Gradio's, which ``RequestBody`` would get in the way of."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: Sequence[str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = tuple(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _under(scope["path"], self.paths):
            await self.app(scope, receive, send)
            return
        too_large = APIError(413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _reject(scope, receive, send, too_large)
            return
        received = 0
        started = refused = answered = False

        async def receiving() -> Message:
            nonlocal received, refused, answered
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            received += len(message.get("body", b""))
            if received <= self.max_bytes:
                return message
            refused = True
            if not started:
                await _reject(scope, receive, send, too_large)
                answered = True
            return {"type": "http.disconnect"}

        async def sending(message: Message) -> None:
            nonlocal started
            if not answered:
                started = started or message["type"] == "http.response.start"
                await send(message)

        await self.app(scope, receiving, sending)


class WebLogin:
    """Under ``prefix``, only the login form (the page's shell, its assets, ``open_paths``) answers a
    browser that has not logged in: Gradio leaves several of its routes open even with a login."""

    def __init__(
        self, app: ASGIApp, prefix: str, open_paths: Sequence[str], logged_in: Callable[[HTTPConnection], bool]
    ) -> None:
        self.app = app
        self.prefix = prefix.rstrip("/")
        self.open_paths = tuple(self.prefix + path for path in open_paths)
        self.logged_in = logged_in

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] not in ("http", "websocket")
            or not _under(path, [self.prefix or "/"])
            or path in (self.prefix, self.prefix + "/")  # the page itself: the login form until logged in
            or _under(path, self.open_paths)
            or self.logged_in(HTTPConnection(scope))
        ):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await _reject(scope, receive, send, APIError(401, "log in to the web page first", code="login_required"))
