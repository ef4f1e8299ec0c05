"""Hub ids, for real: ``glmkit download``, ``glmkit models`` and ``--model owner/name`` against a local
server that answers as the Hugging Face hub does (tests/hub_mirror.py), through the real huggingface_hub."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import V3_DIR, needs_conformance
from hub_mirror import COMMIT, serve_mirror

pytestmark = needs_conformance
REPO = "tiny-org/chatglm3-tiny"


@pytest.fixture
def tiny_repo(tmp_path):
    """The conformance ChatGLM3 checkpoint and tokenizer in one folder, as a hub repository holds them."""
    folder = tmp_path / "repo"
    folder.mkdir()
    for part in ("checkpoint", "tokenizer"):
        for f in (V3_DIR / part).iterdir():
            (folder / f.name).symlink_to(f)
    return folder


def glmkit(*args: str, env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glmkit", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def hub_env(tmp_path, endpoint: str) -> dict:
    return {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}


def test_download_models_and_chat_from_the_hub(tmp_path, tiny_repo):
    extra = {"modeling_chatglm.py": b"raise SystemExit('never run')", "pytorch_model.bin": b"duplicate weights"}
    with serve_mirror(REPO, tiny_repo, extra) as (endpoint, mirror):
        env = hub_env(tmp_path, endpoint)
        result = glmkit("download", REPO, env=env)
        assert result.returncode == 0, result.stderr
        folder = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
        assert result.stdout.strip() == f"{REPO}: {folder}"
        assert sorted(f.name for f in folder.iterdir()) == sorted(f.name for f in tiny_repo.iterdir())
        assert (folder / "model.safetensors").read_bytes() == (tiny_repo / "model.safetensors").read_bytes()
        fetched = {path.rsplit("/", 1)[-1] for method, path, _ in mirror.requests if method == "GET"}
        assert "modeling_chatglm.py" not in fetched and "pytorch_model.bin" not in fetched  # never fetched

        listing = glmkit("models", env=env)
        assert listing.returncode == 0, listing.stderr
        line = next(row for row in listing.stdout.splitlines() if row.startswith(REPO))
        total = sum(f.stat().st_size for f in tiny_repo.iterdir())
        assert "huggingface" in line and f"{total / 1e6:.1f} MB" in line

        answer = glmkit("chat", "-m", REPO, "-q", "hi", "--max-new-tokens", "2", env=env)
        assert answer.returncode == 0, answer.stderr
    # with the mirror gone the cached copy still loads, told at once
    started = time.monotonic()
    offline = glmkit("chat", "-m", REPO, "-q", "hi", "--max-new-tokens", "2", env=env)
    assert offline.returncode == 0, offline.stderr
    assert time.monotonic() - started < 60


def test_a_dropped_connection_is_retried_and_a_rerun_keeps_the_finished_files(tmp_path, tiny_repo):
    weights = "model.safetensors"
    with serve_mirror(REPO, tiny_repo) as (endpoint, mirror):
        env = hub_env(tmp_path, endpoint)
        mirror.breaks[weights] = 1  # the connection drops once, after 1 MiB
        assert glmkit("download", REPO, env=env).returncode == 0
        tries = [path for method, path, _ in mirror.requests if method == "GET" and path.endswith(weights)]
        assert len(tries) >= 2, tries  # huggingface_hub tried again (from the start: it keeps no partial file)

    with serve_mirror(REPO, tiny_repo) as (endpoint, mirror):
        env = hub_env(tmp_path / "second", endpoint)
        mirror.breaks[weights] = 100  # it keeps dropping: the run fails, with one error line
        broken = glmkit("download", REPO, env=env)
        assert broken.returncode == 2, broken.stderr
        assert "error: model 'tiny-org/chatglm3-tiny'" in broken.stderr and "Traceback" not in broken.stderr
        mirror.breaks.clear()
        mirror.requests.clear()
        assert glmkit("download", REPO, env=env).returncode == 0
        fetched = [p.rsplit("/", 1)[-1] for method, p, _ in mirror.requests if method == "GET" and "resolve" in p]
        assert fetched == [weights], "the files finished before the failure are not fetched again"
    folder = tmp_path / "second" / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (folder / weights).read_bytes() == (tiny_repo / weights).read_bytes()


def test_an_unreachable_hub_is_told_within_seconds(tmp_path):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = hub_env(tmp_path, f"http://127.0.0.1:{port}")
    for verb in (["chat", "-m", "nobody/nothing", "-q", "hi"], ["download", "nobody/nothing"]):
        started = time.monotonic()
        result = glmkit(*verb, env=env, timeout=60)
        took = time.monotonic() - started
        assert result.returncode == 2, result.stderr
        assert "cannot be reached" in result.stderr and "Traceback" not in result.stderr
        assert took < 15, f"{took:.1f} s"  # huggingface_hub alone retries for about 23 s


def test_download_of_an_unknown_repo_is_one_error(tmp_path, tiny_repo):
    with serve_mirror(REPO, tiny_repo) as (endpoint, _):
        result = glmkit("download", "tiny-org/missing", env=hub_env(tmp_path, endpoint))
    assert result.returncode == 2
    assert result.stderr.startswith("error: model 'tiny-org/missing'") and "Traceback" not in result.stderr
