"""Resolve what the user named as a model to a local directory: a path, a hub id, or the demo model."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from glmkit.demo_model import ensure_demo_model
from glmkit.errors import GlmkitError, first_line
from glmkit.progress import reporter

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SOURCES = ("huggingface", "modelscope")
REACH_TIMEOUT_SECONDS = 3
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


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _reachable(endpoint: str, timeout: float = REACH_TIMEOUT_SECONDS) -> bool:
    """Whether a TCP connection to the endpoint opens within ``timeout``: huggingface_hub itself retries
    an unreachable host for about 23 s before it says so."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


class _Bar:
    """What huggingface_hub's download of one file reports to (its ``tqdm_class``): glmkit's bar."""

    def __init__(self, advance: Callable[[float], None], **kwargs: Any) -> None:
        self.advance = advance
        self.advance(kwargs.get("initial") or 0)  # the part of a broken download that is resumed

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def update(self, n: float | None = 1) -> None:
        self.advance(n or 0)


@contextlib.contextmanager
def _no_bar() -> Iterator[Callable[[float], None]]:  # every file is cached already
    yield lambda _amount: None


def _from_huggingface(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    endpoint = _endpoint()
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not _reachable(endpoint):
        try:  # a copy downloaded before serves as it is
            cached = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        except Exception:  # not cached either: say so now rather than after huggingface_hub's retries
            raise GlmkitError(
                f"model {repo_id!r} is not a local directory or in the Hugging Face cache, and {endpoint} cannot "
                f"be reached (no connection within {REACH_TIMEOUT_SECONDS:g} s).\n"
                "Fix: check the network, set HF_ENDPOINT to a reachable mirror, or pass a model directory"
            ) from None
        reporter().say(f"{endpoint} cannot be reached: using the cached copy of {repo_id}")
        return cached
    try:
        if offline:
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        listed = snapshot_download(repo_id, revision=revision, ignore_patterns=IGNORED_FILES, dry_run=True)
        if any(f.filename.endswith(".safetensors") for f in listed):  # the same weights twice otherwise
            listed = [f for f in listed if not f.filename.endswith(".bin")]
        if not listed:
            raise GlmkitError(f"{repo_id} on {endpoint} holds no file glmkit reads")
        missing = sum(f.file_size or 0 for f in listed if f.will_download)
        folder: Path | None = None
        bar = reporter().task(f"Downloading {repo_id}", total=missing, unit="B") if missing else _no_bar()
        with bar as advance:
            for f in listed:
                path = hf_hub_download(
                    repo_id, f.filename, revision=f.commit_hash, tqdm_class=functools.partial(_Bar, advance)
                )
                folder = Path(path).parents[len(Path(f.filename).parts) - 1]
        assert folder is not None
        return folder
    except GlmkitError:
        raise
    except Exception as exc:  # huggingface_hub raises many types; all mean "could not get it"
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else endpoint
        raise GlmkitError(
            f"model {repo_id!r} is not a local directory, and fetching it from {where} failed: "
            f"{type(exc).__name__}: {first_line(exc)}\n"
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
    reporter().say(f"Fetching {model_id} from ModelScope…")
    try:
        return Path(snapshot_download(model_id, revision=revision or "master", ignore_file_pattern=IGNORED_FILES))
    except Exception as exc:
        raise GlmkitError(
            f"model {model_id!r} is not a local directory, and fetching it from ModelScope failed: {exc}"
        ) from exc


def cached_models() -> list[tuple[str, str, int, Path]]:
    """What is in the caches: ``(name, where, bytes on disk, path)`` for the demo model, every model in the
    Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and in ModelScope's."""
    from huggingface_hub import scan_cache_dir

    from glmkit.demo_model import DEMO_MODEL_NAME, demo_model_dir

    found: list[tuple[str, str, int, Path]] = []
    demo = demo_model_dir()
    if (demo / "model.safetensors").is_file():
        found.append((DEMO_MODEL_NAME, "demo", _size(demo), demo))
    try:
        hub = scan_cache_dir()
    except Exception:  # no cache yet (or an unreadable one): nothing to list from it
        hub = None
    for repo in sorted(hub.repos if hub else [], key=lambda r: r.repo_id):
        if repo.repo_type == "model":
            found.append((repo.repo_id, "huggingface", repo.size_on_disk, repo.repo_path))
    modelscope = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope")) / "hub"
    for config in sorted(modelscope.glob("**/config.json")):
        folder = config.parent
        found.append((str(folder.relative_to(modelscope)), "modelscope", _size(folder), folder))
    return found


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
