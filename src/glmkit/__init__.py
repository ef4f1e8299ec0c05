"""glmkit: run, serve and fine-tune ChatGLM-family and Hugging Face chat models."""

from importlib.metadata import PackageNotFoundError, version

from glmkit.chat import ChatModel, load
from glmkit.engine import GenerationConfig
from glmkit.errors import GlmkitError

try:
    __version__ = version("glmkit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["ChatModel", "GenerationConfig", "GlmkitError", "__version__", "load"]
