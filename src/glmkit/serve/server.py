"""The FastAPI app (both contracts, health, optional web page) and ``glmkit serve``'s uvicorn runner."""

from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from glmkit.chat import ChatModel
from glmkit.engine.scheduler import Scheduler
from glmkit.serve import legacy, openai_api
from glmkit.serve.backend import Backend
from glmkit.serve.errors import install_error_handlers
from glmkit.serve.middleware import AccessLog, BearerAuth, InternalErrors, RequestBody
from glmkit.serve.openapi import describe_request_bodies

log = logging.getLogger("glmkit.serve")
WEB_PATH = "/web"
SHUTDOWN_GRACE_SECONDS = 5  # on Ctrl-C/SIGTERM, replies still running get this long before they are cut
# paths any client may read without the API key: liveness, and the description of the (public) contract
OPEN_PATHS = ["/health", "/openapi.json", "/docs", WEB_PATH]


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    web: bool = False
    log_prompts: bool = False
    max_active: int = 16
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    #: the longest prompt + reply one request may have (the scheduler's rows hold this many tokens)
    max_model_len: int = 4096
    shutdown_grace_seconds: float = SHUTDOWN_GRACE_SECONDS


def create_app(chat_model: ChatModel, options: ServerOptions | None = None) -> FastAPI:
    """The whole HTTP server for one loaded model; every request is generated through one scheduler."""
    options = options or ServerOptions()
    app_state: dict[str, FastAPI] = {}

    def worker_failed(exc: BaseException) -> None:
        # every later request would fail: stop the process so that a supervisor restarts it
        log.critical("the generation worker stopped; the server shuts down", exc_info=exc)
        stop = getattr(app_state["app"].state, "stop_server", None)
        if stop is not None:
            stop()

    scheduler = Scheduler(
        chat_model.engine,
        max_active=options.max_active,
        max_queue=options.max_queue,
        max_sequence_length=options.max_model_len,
        on_failure=worker_failed,
    )
    backend = Backend(chat_model, scheduler, log_prompts=options.log_prompts)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)  # joins the worker thread: not on the event loop

    app = FastAPI(title="glmkit", lifespan=lifespan, redoc_url=None)
    app_state["app"] = app
    app.state.scheduler = scheduler
    install_error_handlers(app)

    @app.get("/health", responses={503: {"description": "the generation worker has stopped"}})
    async def health() -> JSONResponse:
        """Liveness: 200 while requests are served, 503 once the generation worker has stopped."""
        if not scheduler.alive:
            reason = repr(scheduler.failure) if scheduler.failure else "the generation worker is not running"
            return JSONResponse({"status": "unavailable", "error": reason}, status_code=503)
        active, waiting = scheduler.load
        return JSONResponse({"status": "ok", "active": active, "waiting": waiting})

    app.include_router(legacy.router(backend))
    app.include_router(openai_api.router(backend))
    describe_request_bodies(app)

    # The last middleware added runs first: the log sees everything (401s, 413s), CORS answers
    # preflights (which carry no key) before the key is checked.
    app.add_middleware(InternalErrors)
    app.add_middleware(RequestBody, max_bytes=options.max_body_bytes, exempt=[WEB_PATH])
    if options.api_key:
        # the web page has its own login (the key as password): a browser cannot send a Bearer header
        app.add_middleware(BearerAuth, api_key=options.api_key, open_paths=OPEN_PATHS)
    if options.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=options.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(AccessLog, log_prompts=options.log_prompts)
    if options.web:
        _mount_web(app, chat_model, scheduler, options)
    return app


def _mount_web(app: FastAPI, chat_model: ChatModel, scheduler: Scheduler, options: ServerOptions) -> None:
    import gradio

    from glmkit.web.app import build_web

    def login(_user: str, password: str) -> bool:  # any user name, the API key as password
        return hmac.compare_digest(password.encode(), (options.api_key or "").encode())

    gradio.mount_gradio_app(
        app,
        build_web(chat_model, scheduler),
        path=WEB_PATH,
        auth=login if options.api_key else None,
        max_file_size=options.max_body_bytes,  # the page takes no files; uploads get the API's limit
        ssr_mode=False,
    )


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_config() -> dict:
    """uvicorn's logging, plus glmkit's loggers (access log included) with a timestamp."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["glmkit"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(asctime)s %(message)s",
        "datefmt": "%Y-%m-%d %H:%M:%S",
    }
    config["handlers"]["glmkit"] = {
        "formatter": "glmkit",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["glmkit"] = {"handlers": ["glmkit"], "level": "INFO", "propagate": False}
    return config


class _Server(uvicorn.Server):
    """uvicorn, with glmkit's own end to running replies: after the grace period the scheduler is
    closed, so each stream still open gets an error event and a clean end instead of being cut off
    when uvicorn's (slightly longer) graceful timeout cancels it."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace_seconds: float) -> None:
        super().__init__(config)
        self.scheduler = scheduler
        self.grace_seconds = grace_seconds

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        cut = loop.call_later(self.grace_seconds, lambda: loop.run_in_executor(None, self.scheduler.close))
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()


def run_server(chat_model: ChatModel, options: ServerOptions) -> None:
    """Serve until Ctrl-C or SIGTERM; then running replies get a short grace and the scheduler is closed.

    If the generation worker dies, the server stops and this raises, so the process exits non-zero.
    """
    app = create_app(chat_model, options)
    scheduler: Scheduler = app.state.scheduler
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        access_log=False,  # glmkit's own access log has the token counts
        log_config=_log_config(),
        timeout_graceful_shutdown=int(options.shutdown_grace_seconds) + 2,
    )
    server = _Server(config, scheduler, options.shutdown_grace_seconds)

    def stop_server() -> None:
        server.should_exit = True

    app.state.stop_server = stop_server
    host = f"[{options.host}]" if ":" in options.host else options.host
    base = f"http://{host}:{options.port}"
    log.info("model %s: ChatGLM API at %s/, OpenAI API at %s/v1", chat_model.name, base, base)
    if options.web:
        log.info("web page at %s%s/", base, WEB_PATH)
    if not _is_loopback(options.host) and not options.api_key:
        log.warning("listening on %s without an API key: anyone who can reach it can use the model", options.host)
    server.run()
    if scheduler.failure is not None:
        raise SystemExit(f"error: the generation worker stopped ({scheduler.failure!r}); restart the server")
