"""The FastAPI app (both contracts, health, optional web page) and the uvicorn runner of ``glmkit serve``
and ``glmkit web`` (the same server, with the page alone at /)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import hmac
import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection

from glmkit.chat import ChatModel
from glmkit.engine.scheduler import DEFAULT_PREFILL_CHUNK, Scheduler
from glmkit.errors import GlmkitError
from glmkit.progress import elapsed
from glmkit.serve import legacy, openai_api, pages
from glmkit.serve.backend import Backend
from glmkit.serve.errors import install_error_handlers
from glmkit.serve.middleware import AccessLog, BearerAuth, BodyLimit, InternalErrors, RequestBody, WebLogin
from glmkit.serve.openapi import describe_request_bodies

log = logging.getLogger("glmkit.serve")
WEB_PATH = "/web"
SHUTDOWN_GRACE_SECONDS = 5  # on Ctrl-C/SIGTERM, replies still running get this long before they are cut
# paths any client may read without the API key: liveness, and the description of the (public) contract
OPEN_PATHS = ["/health", "/openapi.json", "/docs", WEB_PATH]
# what the page's login form loads, under its path; every other route of the page needs the login
WEB_LOGIN_FORM = ["/login", "/assets", "/static", "/theme.css"]


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    web: bool = False
    api: bool = True  # the ChatGLM and OpenAI routes; without them (glmkit web) the page is at /
    log_prompts: bool = False
    max_active: int = 16
    max_queue: int = 64
    kv_cache_gb: float | None = None  # the batch KV cache's size; None: the scheduler's default
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    max_body_bytes: int = 1 << 20
    #: the longest prompt + reply one request may have (the scheduler's rows hold this many tokens)
    max_model_len: int = 4096
    shutdown_grace_seconds: float = SHUTDOWN_GRACE_SECONDS
    verbose: bool = False  # uvicorn's own start-up lines too


def create_app(chat_model: ChatModel, options: ServerOptions | None = None) -> FastAPI:
    """The whole HTTP server for one loaded model; every request is generated through one scheduler."""
    options = options or ServerOptions()
    def worker_failed(exc: BaseException) -> None:
        # every later request would fail: stop the process so that a supervisor restarts it
        log.critical("the generation worker stopped; the server shuts down", exc_info=exc)
        stop = getattr(app.state, "stop_server", None)  # app: assigned below, before any request runs
        if stop is not None:
            stop()

    scheduler = Scheduler(
        chat_model.engine,
        max_active=options.max_active,
        max_queue=options.max_queue,
        max_sequence_length=options.max_model_len,
        on_failure=worker_failed,
        kv_cache_bytes=None if options.kv_cache_gb is None else int(options.kv_cache_gb * 2**30),
        prefill_chunk=options.prefill_chunk,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)  # joins the worker thread: not on the event loop

    # the OpenAPI description and its page (glmkit's own /docs) belong to the API; glmkit web has neither
    docs = {} if options.api else {"openapi_url": None}
    app = FastAPI(title="glmkit", lifespan=lifespan, docs_url=None, redoc_url=None, **docs)
    app.state.scheduler = scheduler
    app.state.on_stop = []  # what ends streams that would hold a graceful shutdown open (see _Server)
    install_error_handlers(app)

    @app.get("/health", responses={503: {"description": "the generation worker has stopped"}})
    async def health() -> JSONResponse:
        """Liveness: 200 while requests are served, 503 once the generation worker has stopped."""
        if not scheduler.alive:
            reason = repr(scheduler.failure) if scheduler.failure else "the generation worker is not running"
            return JSONResponse({"status": "unavailable", "error": reason}, status_code=503)
        active, waiting = scheduler.load
        return JSONResponse({"status": "ok", "active": active, "waiting": waiting})

    # The last middleware added runs first: the log sees everything (401s, 413s), CORS answers
    # preflights (which carry no key) before the key is checked.
    app.add_middleware(InternalErrors)
    app.include_router(pages.router(chat_model.name, WEB_PATH if options.web else None, options.api))
    if options.api:
        backend = Backend(chat_model, scheduler, log_prompts=options.log_prompts)
        app.include_router(legacy.router(backend))
        app.include_router(openai_api.router(backend))
        describe_request_bodies(app)
        app.add_middleware(RequestBody, max_bytes=options.max_body_bytes, exempt=[WEB_PATH])
    if options.web:
        _mount_web(app, chat_model, scheduler, options, WEB_PATH if options.api else "/")
    if options.api and options.api_key:
        # the web page has its own login (the key as password): a browser cannot send a Bearer header
        app.add_middleware(BearerAuth, api_key=options.api_key, open_paths=OPEN_PATHS, open_pages=pages.PAGE_PATHS)
    # always there, with no origins when --cors is not given: Gradio then leaves CORS to it, instead of
    # answering every http://localhost:* page with credentials allowed
    app.add_middleware(
        CORSMiddleware,
        allow_origins=options.cors_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],
    )
    app.add_middleware(AccessLog, log_prompts=options.log_prompts)
    return app


def _mount_web(app: FastAPI, chat_model: ChatModel, scheduler: Scheduler, options: ServerOptions, path: str) -> None:
    """The chat page at ``path``, with the API's body limit and, under an API key, a login for all of it."""
    import gradio
    from starlette.routing import Mount

    from glmkit.web.app import build_web

    with contextlib.suppress(ImportError):
        # Gradio switches matplotlib's backend around every event it runs; the first switch imports
        # pyplot on the event loop, a second in which no request is answered: pay it at start-up
        import matplotlib

        matplotlib.get_backend()

    def login(_user: str, password: str) -> bool:  # any user name, the API key as password
        return hmac.compare_digest(password.encode(), (options.api_key or "").encode())

    gradio.mount_gradio_app(
        app,
        build_web(chat_model, scheduler, api_docs="/docs" if options.api else None),
        path=path,
        auth=login if options.api_key else None,
        auth_message="Any user name works; the password is the server's API key (--api-key).",
        footer_links=["settings"],  # not Gradio's own API page: the footer links glmkit's HTTP API instead
        max_file_size=options.max_body_bytes,  # the page takes no files; uploads get the API's limit
        ssr_mode=False,
        favicon_path=str(pages.FAVICON) if path == "/" else None,  # under /web, the server's own /favicon.ico
        run_history=False,  # its routes would save runs to a Hugging Face bucket: calls to huggingface.co
        app_kwargs={"openapi_url": None},  # Gradio's FastAPI schema: public, and no use to the page
    )
    page = app.routes[-1]
    assert isinstance(page, Mount)
    # each open tab holds a heartbeat stream that only ends when this is set, as Blocks.close() does
    app.state.on_stop.append(page.app.stop_event.set)
    # Gradio streams request bodies and answers over open connections: RequestBody exempts the page
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes, paths=[path])
    if options.api_key:
        cookies = [f"access-token-{page.app.cookie_id}", f"access-token-unsecure-{page.app.cookie_id}"]

        def logged_in(connection: HTTPConnection) -> bool:  # Gradio's own test: a token it handed out
            return any(connection.cookies.get(name) in page.app.tokens for name in cookies)

        app.add_middleware(WebLogin, prefix=path, open_paths=WEB_LOGIN_FORM, logged_in=logged_in)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _StartLines(logging.Filter):
    """uvicorn's start-up lines, which glmkit's "Ready" line replaces (its shutdown lines stay)."""

    SAID = (
        "Started server process",
        "Waiting for application startup",
        "Application startup complete",
        "Uvicorn running",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.SAID)


def _log_config(verbose: bool = False) -> dict:
    """uvicorn's logging, plus glmkit's loggers (access log included) with a timestamp."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    if not verbose:
        config.setdefault("filters", {})["start_lines"] = {"()": _StartLines}
        config["handlers"]["default"]["filters"] = ["start_lines"]
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
    """uvicorn, ending what would hold its graceful shutdown open: the page's heartbeats at once, and
    after the grace the replies still running (the scheduler is closed, so each ends with a message on
    the page or an error event instead of being cancelled mid-stream by uvicorn's timeout).  Once it
    listens, it says so: "Ready in N s" and the addresses."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_seconds: float, ready: Callable[[], None]) -> None:
        super().__init__(config)
        self.glmkit_app = app
        self.grace_seconds = grace_seconds
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        on_stop: list[Callable[[], None]] = self.glmkit_app.state.on_stop
        for stop in on_stop:
            stop()
        loop = asyncio.get_running_loop()
        close = self.glmkit_app.state.scheduler.close  # joins the worker thread: not on the event loop
        cut = loop.call_later(self.grace_seconds, lambda: loop.run_in_executor(None, close))
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a busy port or a bad address is a one-line
    mistake at once, not after minutes of loading."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        info = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise GlmkitError(f"cannot listen on {host}: the address does not resolve ({exc})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
    try:
        sock.bind(info[0][4])  # uvicorn starts listening once the model is loaded: until then, connections are refused
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise GlmkitError(f"port {port} on {host} is already in use: stop what uses it or pick --port") from None
        raise GlmkitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def addresses(options: ServerOptions, port: int) -> list[tuple[str, str]]:
    """What a person can open, by name: the page, both APIs and their docs."""
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    shown: list[tuple[str, str]] = []
    if options.web:
        shown.append(("browser chat", f"{base}{WEB_PATH}/" if options.api else f"{base}/"))
    if options.api:
        shown += [("ChatGLM API", f"POST {base}/"), ("OpenAI API", f"{base}/v1"), ("API docs", f"{base}/docs")]
    return shown


def run_server(chat_model: ChatModel, options: ServerOptions, sock: socket.socket | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM; then running replies get a short grace and the scheduler is closed.

    ``sock``: the socket ``bind`` returned (bound before the model loaded); by default it is bound here.
    If the generation worker dies, the server stops and this raises, so the process exits non-zero.
    """
    sock = sock or bind(options.host, options.port)
    app = create_app(chat_model, options)
    scheduler: Scheduler = app.state.scheduler
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        access_log=False,  # glmkit's own access log has the token counts
        log_config=_log_config(options.verbose),
        # a backstop: the grace is _Server's, then a reply ends at the scheduler's next step (seconds, on a busy CPU)
        timeout_graceful_shutdown=int(options.shutdown_grace_seconds) + 5,
    )
    shown = addresses(options, sock.getsockname()[1])
    width = max(len(name) for name, _ in shown)

    def ready() -> None:
        lines = [f"  {name:<{width}}  {url}" for name, url in shown]
        log.info("Ready in %.1f s (%s; Ctrl-C stops it):\n%s", elapsed(), chat_model.name, "\n".join(lines))
        if not _is_loopback(options.host) and not options.api_key:
            log.warning("listening on %s without an API key: anyone who can reach it can use the model", options.host)

    server = _Server(config, app, options.shutdown_grace_seconds, ready)

    def stop_server() -> None:
        server.should_exit = True

    app.state.stop_server = stop_server
    # uvicorn raises SIGTERM again once it has shut down gracefully; a stop that went as asked exits 0
    # (signal handlers belong to the main thread: elsewhere, as in tests, uvicorn installs none either)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if in_main else None
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    if scheduler.failure is not None:
        raise SystemExit(f"error: the generation worker stopped ({scheduler.failure!r}); restart the server")
