"""Prompt templates by name, and the choice of one for a checkpoint."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from glmkit.errors import GlmkitError
from glmkit.templates.base import ChatTemplate, Message

# name -> module holding a ``TEMPLATE`` object; imported on first use
_MODULES = {
    "hf": "glmkit.templates.hf",
    "chatglm": "glmkit.templates.chatglm",
    "chatglm2": "glmkit.templates.chatglm2",
    "chatglm3": "glmkit.templates.chatglm3",
    "characterglm": "glmkit.templates.characterglm",
    "glm4": "glmkit.templates.glm4",
}
TEMPLATE_NAMES = tuple(_MODULES)


def get_template(name: str) -> ChatTemplate:
    if name not in _MODULES:
        raise GlmkitError(f"unknown template {name!r}: choose one of {', '.join(TEMPLATE_NAMES)}")
    return importlib.import_module(_MODULES[name]).TEMPLATE


def detect_template(model_dir: Path, config: dict[str, Any]) -> str:
    """The template a checkpoint was trained with, from its config and tokenizer files."""
    from glmkit.models import CHATGLM_FAMILIES, model_family

    family = model_family(config)
    if family not in CHATGLM_FAMILIES:
        return "hf"
    from glmkit.templates.chatglm_detect import detect_chatglm_template

    return detect_chatglm_template(model_dir, config) or ("chatglm" if family == "chatglm" else "chatglm3")


__all__ = ["TEMPLATE_NAMES", "ChatTemplate", "Message", "detect_template", "get_template"]
