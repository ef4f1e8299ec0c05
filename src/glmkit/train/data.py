"""Training data: formats, tokenization with label masks, batching.  The public names of ``glmkit.train``'s
data side, for the trainer and the ``glmkit data`` / ``glmkit eval`` verbs."""

from __future__ import annotations

from typing import Any

from glmkit.hub import resolve_model
from glmkit.models import load_tokenizer, read_config
from glmkit.templates import ChatTemplate, detect_template, get_template
from glmkit.train.collator import DataCollator
from glmkit.train.examples import DataArgs, Example, Examples, example_to_row, load_examples
from glmkit.train.formats import FORMATS
from glmkit.train.layouts import IGNORE, DataStats, Encoded, TokenizedRows, encode_example, tokenize_examples


def load_tokenizer_and_template(
    model: str | None, args: DataArgs, source: str = "huggingface", revision: str | None = None
) -> tuple[Any, ChatTemplate]:
    """A model's tokenizer and prompt template (``args.template`` or the one chat detects), without
    loading its weights.  A per-file character card picks the CharacterGLM template, as in chat."""
    model_dir = resolve_model(model, source=source, revision=revision)
    name = args.template or ("characterglm" if args.character else detect_template(model_dir, read_config(model_dir)))
    return load_tokenizer(model_dir), get_template(name)


__all__ = [
    "FORMATS",
    "IGNORE",
    "DataArgs",
    "DataCollator",
    "DataStats",
    "Encoded",
    "Example",
    "Examples",
    "TokenizedRows",
    "encode_example",
    "example_to_row",
    "load_examples",
    "load_tokenizer_and_template",
    "tokenize_examples",
]
