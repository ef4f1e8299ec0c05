"""HTTP serving: the ChatGLM ``POST /`` contract and an OpenAI-compatible ``/v1``, on one scheduler."""

from glmkit.serve.server import ServerOptions, create_app, run_server

__all__ = ["ServerOptions", "create_app", "run_server"]
