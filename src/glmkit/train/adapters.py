"""Put what ``glmkit train`` produced over a loaded chat model (PART A's ``glmkit eval`` calls this)."""

from __future__ import annotations

from pathlib import Path

from glmkit.chat import ChatModel
from glmkit.models import adapters


def apply_adapter(chat_model: ChatModel, path: str | Path, merge: bool = True) -> ChatModel:
    """Apply a LoRA adapter folder (merged into the weights unless ``merge`` is False) or a P-Tuning v2
    checkpoint folder to ``chat_model``'s network, told apart by the folder's files; returns ``chat_model``."""
    adapters.apply_adapter(chat_model.model, path, merge=merge)
    chat_model._session.reset()  # keys/values cached by the base model are stale now
    return chat_model
