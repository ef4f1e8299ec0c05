"""Shared fixtures: the bundled demo model (converted once per machine), a tiny random Llama, and a real
server on loopback with the check of the OpenAI error shape."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

# outputs of the official reference code, beside the checkout (never copied into the project)
CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"
V1_DIR = CONFORMANCE / "chatglm_v1"
V3_DIR = CONFORMANCE / "chatglm_v3"
GLM4_DIR = CONFORMANCE / "glm4"
# one OpenAI-style function tool, as GLM-4 tool-call tests offer it
GLM4_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "查询城市的天气",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
needs_conformance = pytest.mark.skipif(
    not CONFORMANCE.is_dir(), reason=f"conformance data not found at {CONFORMANCE} (it sits beside the checkout)"
)
ERROR_FIELDS = {"message", "type", "param", "code"}


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def live_server(app) -> Iterator[str]:
    """uvicorn in a thread on a socket bound beforehand (no port race); yields the base URL."""
    sock = listening_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert body["error"]["message"]
    return body["error"]

# real fine-tuning data (ADGEN rows), beside the checkout like the conformance data
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ADGEN = DATA / "adgen"
needs_data = pytest.mark.skipif(
    not ADGEN.is_dir(), reason=f"fine-tuning data not found at {ADGEN} (it sits beside the checkout)"
)


def load_expected(directory: Path) -> dict:
    """A folder's expected.json, or {} when the data is absent (its tests skip)."""
    path = directory / "expected.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@pytest.fixture(scope="session")
def v1():
    """The real ChatGLM-6B tokenizer (ice_text.model)."""
    from glmkit.models.tokenization_chatglm import ChatGLMTokenizer

    return ChatGLMTokenizer.from_pretrained(V1_DIR / "tokenizer")


@pytest.fixture(scope="session")
def v3():
    """The real ChatGLM2/3 tokenizer (tokenizer.model), as chatglm3-6b configures it."""
    from glmkit.models.tokenization_chatglm2 import ChatGLM2Tokenizer

    return ChatGLM2Tokenizer.from_pretrained(V3_DIR / "tokenizer")


@pytest.fixture(scope="session")
def v2():
    """The same tokenizer.model, named as chatglm2-6b's tokenizer_config.json names it."""
    from glmkit.models.tokenization_chatglm2 import ChatGLM2Tokenizer

    return ChatGLM2Tokenizer.from_pretrained(V3_DIR / "tokenizer", name_or_path="THUDM/chatglm2-6b")


@pytest.fixture(scope="session")
def glm4_tokenizer():
    """The real glm-4-9b-chat tokenizer (tokenizer.model as tiktoken ranks)."""
    from glmkit.models import load_tokenizer

    if not GLM4_DIR.is_dir():
        pytest.skip(f"GLM-4 conformance data not found at {GLM4_DIR} (it sits beside the checkout)")
    return load_tokenizer(GLM4_DIR / "tokenizer")


@pytest.fixture(scope="session")
def demo_chat():
    import glmkit

    return glmkit.load(device="cpu")


@pytest.fixture(scope="session")
def tiny_llama():
    """A random 2-layer Llama driven through glmkit's transformers adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from glmkit.models.hf_causal_lm import HFCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return HFCausalLM(LlamaForCausalLM(config).eval())
