"""glmkit's own generation engine (no ``transformers.generate``)."""

from glmkit.engine.config import GenerationConfig
from glmkit.engine.generate import Chunk, DecodeSession, Engine, GenerationResult, generate_tokens, iter_tokens

__all__ = [
    "Chunk",
    "DecodeSession",
    "Engine",
    "GenerationConfig",
    "GenerationResult",
    "generate_tokens",
    "iter_tokens",
]
