"""Resolve what the user named as a model to a local directory: a path, a hub id, or the demo model."""

from __future__ import annotations

import os
import re
from pathlib import Path

from glmkit.demo_model import ensure_demo_model
from glmkit.errors import GlmkitError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SOURCES = ("huggingface", "modelscope")
# never fetched: code (glmkit runs none of it) and formats glmkit does not read
IGNORED_FILES = ["*.py", "*.msgpack", "*.h5", "*.ot", "*.onnx", "*.gguf", "*.pt"]


def resolve_model(
    reference: str | Path | None = None, source: str = "huggingface", revision: str | None = None
) -> Path:
    """A directory holding the model.  ``None`` or ``"demo"`` is the bundled demo model."""
    if source not in SOURCES:
        raise GlmkitError(f"unknown model source {source!r}: use {' or '.join(SOURCES)}")
    if reference is None or str(reference) == "demo":
        return ensure_demo_model()
    path = Path(reference).expanduser()
    if path.is_dir():
        return path
    text = str(reference)
    if path.exists() or text.startswith((".", "/", "~")) or not HUB_ID.fullmatch(text):
        raise GlmkitError(
            f"model {text!r} not found: it is not a directory here"
            + ("" if HUB_ID.fullmatch(text) else " and not a hub id of the form owner/name")
        )
    if source == "modelscope":
        return _from_modelscope(text, revision)
    return _from_huggingface(text, revision)


def _from_huggingface(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        ignore = list(IGNORED_FILES)
        if not offline:
            files = HfApi(endpoint=endpoint).list_repo_files(repo_id, revision=revision)
            if any(f.endswith(".safetensors") for f in files):
                ignore.append("*.bin")  # the same weights twice otherwise
        return Path(
            snapshot_download(repo_id, revision=revision, ignore_patterns=ignore, local_files_only=offline)
        )
    except Exception as exc:  # huggingface_hub raises many types; all mean "could not get it"
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else endpoint
        raise GlmkitError(
            f"model {repo_id!r} is not a local directory, and fetching it from {where} failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}\n"
            "Fix: pass the path of a downloaded model directory, check the id, or set HF_ENDPOINT to a "
            "reachable mirror (unset HF_HUB_OFFLINE to allow downloads)"
        ) from exc


def _from_modelscope(model_id: str, revision: str | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise GlmkitError(
            "--source modelscope needs the modelscope package: pip install 'glmkit[modelscope]'"
        ) from None
    try:
        return Path(snapshot_download(model_id, revision=revision or "master", ignore_file_pattern=IGNORED_FILES))
    except Exception as exc:
        raise GlmkitError(
            f"model {model_id!r} is not a local directory, and fetching it from ModelScope failed: {exc}"
        ) from exc
