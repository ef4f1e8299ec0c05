"""The HTTP server, for real: uvicorn on 127.0.0.1 with the bundled demo model, driven by httpx, raw
sockets and the official ``openai`` client.  Replies are kept to a few tokens so the module stays quick."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import openai
import pytest
from conftest import listening_socket, live_server, openai_error

from glmkit.serve import ServerOptions, create_app

FRANCE = "What is the capital of France?"
LONG_STORY = "Tell me a long story about a dragon."
KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def server(demo_chat) -> Iterator[str]:
    with live_server(create_app(demo_chat, ServerOptions(max_active=16, max_queue=64))) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def greedy_france(client) -> str:
    """The single-client greedy answer, streamed, as every concurrent client must get it too."""
    text, finish = _stream(client, [{"role": "user", "content": FRANCE}], temperature=0)
    assert finish == "stop"
    assert "Paris" in text
    return text


def _stream(client: openai.OpenAI, messages: list, **options) -> tuple[str, str | None]:
    pieces, finish = [], None
    for event in client.chat.completions.create(model="any", messages=messages, stream=True, **options):
        for choice in event.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(pieces), finish


# -- the ChatGLM contract ---------------------------------------------------------------------------
def test_legacy_contract_field_by_field(server):
    before = datetime.now().replace(microsecond=0)
    request = {"prompt": FRANCE, "history": [], "max_length": 2048, "top_p": 0.7, "temperature": 0}
    response = httpx.post(f"{server}/", json=request, timeout=300)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"response", "history", "status", "time"}
    assert "Paris" in body["response"]
    assert body["response"] == body["response"].strip()  # post-processed
    assert body["history"] == [[FRANCE, body["response"]]]
    assert body["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", body["time"])
    assert before <= datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S") <= datetime.now()

    follow_up = {"prompt": "And of Germany?", "history": body["history"], "temperature": 0}
    second = httpx.post(f"{server}/", json=follow_up, timeout=300).json()
    assert "Berlin" in second["response"]
    assert second["history"] == [[FRANCE, body["response"]], ["And of Germany?", second["response"]]]


def test_legacy_explicit_zero_top_p_is_greedy_and_any_content_type(server, greedy_france):
    # curl -d sends application/x-www-form-urlencoded; the original api.py read JSON regardless
    payload = json.dumps({"prompt": FRANCE, "temperature": 1.0, "top_p": 0})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    body = httpx.post(f"{server}/", content=payload, headers=headers, timeout=300).json()
    assert body["response"] == greedy_france.strip()


# -- the OpenAI contract ----------------------------------------------------------------------------
def test_health_models_and_cors_off(server, client, demo_chat):
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "active": 0, "waiting": 0}
    assert [model.id for model in client.models.list()] == [demo_chat.name]
    response = httpx.get(f"{server}/v1/models", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in response.headers


def test_openai_non_streaming(client, demo_chat, greedy_france):
    messages = [{"role": "user", "content": FRANCE}]
    completion = client.chat.completions.create(model="gpt-4o", messages=messages, temperature=0)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == demo_chat.name  # any model name is accepted; the loaded model answers
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_france.strip()
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage.prompt_tokens == len(demo_chat.encode(demo_chat.build_messages(FRANCE)))
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_streaming_events(server, greedy_france):
    request = {
        "model": "x",
        "messages": [{"role": "user", "content": FRANCE}],
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=request, timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(event["object"] == "chat.completion.chunk" for event in events)
    assert len({event["id"] for event in events}) == 1
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    *content, last, usage = events
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in content) == greedy_france
    assert len(content) > 3, "the reply should arrive in several pieces"
    assert all(e["choices"][0]["finish_reason"] is None for e in content)
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0


def test_max_tokens_gives_finish_reason_length(client):
    messages = [{"role": "user", "content": LONG_STORY}]
    completion = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 3
    text, finish = _stream(client, messages, temperature=0, max_completion_tokens=3)
    assert finish == "length" and text.strip() == completion.choices[0].message.content


def test_stop_strings(client, greedy_france):
    messages = [{"role": "user", "content": FRANCE}]
    cut = greedy_france[: greedy_france.index("Paris")]
    completion = client.chat.completions.create(model="m", messages=messages, temperature=0, stop="Paris")
    assert completion.choices[0].message.content == cut.strip()
    assert completion.choices[0].finish_reason == "stop"
    text, finish = _stream(client, messages, temperature=0, stop=["zzz", "Paris"])
    assert (text, finish) == (cut, "stop")


def test_seeded_sampling_is_reproducible(client):
    messages = [{"role": "user", "content": "Write a line about the sea."}]
    options = {"temperature": 1.0, "top_p": 0.95, "seed": 11, "max_tokens": 8}
    first = client.chat.completions.create(model="m", messages=messages, **options)
    second = client.chat.completions.create(model="m", messages=messages, **options)
    assert first.choices[0].message.content == second.choices[0].message.content


def test_roles_map_to_the_template_and_harmless_fields_are_ignored(server, demo_chat):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "4", "tool_call_id": "call_1"},
        {"role": "user", "content": "Thanks."},
    ]
    request = {"messages": messages, "max_tokens": 1, "user": "u1", "presence_penalty": 0, "n": 1}
    body = httpx.post(f"{server}/v1/chat/completions", json=request, timeout=300).json()
    expected = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": ""},
        {"role": "observation", "content": "4"},
        {"role": "user", "content": "Thanks."},
    ]
    assert body["usage"]["prompt_tokens"] == len(demo_chat.encode(expected))
    assert body["usage"]["completion_tokens"] == 1


def test_a_tool_call_in_the_history_of_a_model_without_tool_turns_is_text(server, demo_chat):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "4", "tool_call_id": "c1"},
    ]
    body = httpx.post(f"{server}/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=300)
    assert body.status_code == 200, body.text
    as_text = [
        messages[0],
        {"role": "assistant", "content": '{"name": "add", "parameters": {"a": 2, "b": 2}}'},
        {"role": "observation", "content": "4"},
    ]
    assert body.json()["usage"]["prompt_tokens"] == len(demo_chat.encode(as_text))


def test_16_concurrent_streaming_clients_get_the_single_client_answer(client, greedy_france):
    messages = [{"role": "user", "content": FRANCE}]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: _stream(client, messages, temperature=0), range(16)))
    assert results == [(greedy_france, "stop")] * 16


# -- client mistakes --------------------------------------------------------------------------------
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
BAD_ARGUMENTS = {"name": "f", "arguments": "{"}
F = {"name": "f"}
BAD_REQUESTS = [
    # (path, body: bytes or JSON, status, param or None, code or None)
    (CHAT, b'{"messages": [', 400, None, None),
    (CHAT, b"", 400, None, None),
    (CHAT, [1, 2], 400, None, None),
    (CHAT, {}, 400, "messages", None),
    (CHAT, {"messages": []}, 400, "messages", None),
    (CHAT, {"messages": "hi"}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", None),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content", None),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.0.content", None),
    (CHAT, {"messages": USER, "temperature": "0.5"}, 400, "temperature", None),
    (CHAT, {"messages": USER, "temperature": 2.5}, 400, "temperature", None),
    (CHAT, {"messages": USER, "temperature": -1}, 400, "temperature", None),
    (CHAT, {"messages": USER, "top_p": 1.5}, 400, "top_p", None),
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens", None),
    (CHAT, {"messages": USER, "max_tokens": 1.5}, 400, "max_tokens", None),
    (CHAT, {"messages": USER, "stream": "yes"}, 400, "stream", None),
    (CHAT, {"messages": USER, "stop": 5}, 400, "stop", None),
    (CHAT, {"messages": USER, "stop": ["a", ""]}, 400, "stop.1", None),
    (CHAT, {"messages": USER, "seed": "1"}, 400, "seed", None),
    (CHAT, {"messages": USER, "n": 2}, 400, "n", None),
    (CHAT, {"messages": USER, "logprobs": True}, 400, "logprobs", None),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools.0.function", None),
    (CHAT, {"messages": USER, "tools": [{"type": "code", "function": {"name": "f"}}]}, 400, "tools.0.type", None),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice", None),
    (CHAT, {"messages": [{"role": "user", "content": "", "tool_calls": [{"function": F}]}]}, 400, "messages.0", None),
    (CHAT, {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}}, 400, None, None),
    (
        CHAT,
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": BAD_ARGUMENTS}]}]},
        400,
        "messages.0.tool_calls.0.function.arguments",
        None,
    ),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format", None),
    (CHAT, {"messages": USER, "character": {"bot_name": "A"}}, 400, "character.user_name", None),
    (CHAT, {"messages": USER, "character": {"bot_name": "A", "user_name": "B"}}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "user", "content": "hello " * 9000}]}, 400, "messages", "context_length_exceeded"),
    ("/", {}, 400, "prompt", None),
    ("/", {"prompt": 5}, 400, "prompt", None),
    ("/", {"prompt": "hi", "history": [["q"]]}, 400, "history.0.1", None),
    ("/", {"prompt": "hi", "history": "none"}, 400, "history", None),
    ("/", {"prompt": "hi", "top_p": 2}, 400, "top_p", None),
    ("/", {"prompt": "hi", "max_length": "long"}, 400, "max_length", None),
    ("/", {"prompt": "hi", "max_length": 5}, 400, "prompt", "context_length_exceeded"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), BAD_REQUESTS)
def test_bad_input_gets_a_4xx_naming_the_problem(server, path, body, status, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}{path}", content=content, headers={"Content-Type": "application/json"})
    error = openai_error(response, status)
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code), error


def test_body_size_limit(server):
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    assert openai_error(httpx.post(f"{server}/", content=big), 413)["code"] == "request_too_large"
    chunked = httpx.post(f"{server}/", content=iter([big[: 1 << 19], big[1 << 19 :]]))  # no Content-Length
    assert openai_error(chunked, 413)["code"] == "request_too_large"


def test_unknown_routes_and_methods(server):
    assert openai_error(httpx.get(f"{server}/nowhere"), 404)
    assert openai_error(httpx.get(f"{server}{CHAT}"), 405)


# -- busy server and clients that go away -----------------------------------------------------------
def _open_stream(url: str, messages: list, **options) -> socket.socket:
    """A streaming request on a raw socket, so the test decides exactly when the client goes away."""
    body = json.dumps({"messages": messages, "stream": True, **options}).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=300)
    head = f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        piece = sock.recv(65536)
        assert piece, f"the connection closed before {marker!r}: {data!r}"
        data += piece
    return data


def test_full_queue_429_and_clients_that_leave_free_their_slots(demo_chat, caplog):
    caplog.set_level("INFO", logger="glmkit.access")
    long = {"messages": [{"role": "user", "content": LONG_STORY}], "temperature": 0, "max_tokens": 4000}
    short = {"messages": [{"role": "user", "content": FRANCE}], "temperature": 0, "max_tokens": 2}
    options = ServerOptions(max_active=1, max_queue=1, log_prompts=True)
    with live_server(create_app(demo_chat, options)) as url:
        active = _open_stream(url, **long)
        assert _read_until(active, b"data: ").startswith(b"HTTP/1.1 200")
        queued = _open_stream(url, **long, stream=False)  # waits in the queue: no response yet
        time.sleep(1.0)
        busy = httpx.post(f"{url}{CHAT}", json=short, timeout=60)
        assert openai_error(busy, 429)["code"] == "queue_full"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        assert int(busy.headers["Retry-After"]) >= 1

        # Both clients leave: the queued one must never start, the active one must stop at once.
        # Were either still there, the next request would wait behind ~4000 tokens (or get 429).
        queued.close()
        active.close()
        started = time.monotonic()
        while (response := httpx.post(f"{url}{CHAT}", json=short, timeout=60)).status_code == 429:
            assert time.monotonic() - started < 10, "the slots were not freed"
            time.sleep(0.1)
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 2
        assert time.monotonic() - started < 60
    lines = [record.getMessage() for record in caplog.records if record.name == "glmkit.access"]
    assert len([line for line in lines if '" 499 ' in line]) == 2, "the log marks both abandoned requests"
    assert all(LONG_STORY in line for line in lines if '" 499 ' in line), "--log-prompts logs the messages"


# -- API key, CORS, access log, shutdown: `glmkit serve` in a subprocess ---------------------------
@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    sock = listening_socket()
    port = sock.getsockname()[1]
    sock.close()  # glmkit serve binds it again (SO_REUSEADDR): the gap is tiny
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "GLMKIT_API_KEY": KEY}
    command = [sys.executable, "-m", "glmkit", "serve", "--port", str(port), "--device", "cpu"]
    command += ["--cors", "http://allowed.example", "--max-active", "2"]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the server did not start: " + log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    yield url, process, log
    if process.poll() is None:
        process.kill()
        process.wait()


def test_api_key_is_enforced_except_on_health(keyed_server):
    url, _, _ = keyed_server
    assert httpx.get(f"{url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        error = openai_error(httpx.get(f"{url}/v1/models", headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    response = httpx.post(f"{url}/", json={"prompt": "hi"})
    assert openai_error(response, 401) and response.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
    secret = "the-secret-prompt-text"
    messages = [{"role": "user", "content": f"Repeat {secret}"}]
    completion = client.chat.completions.create(model="m", messages=messages, max_tokens=2)
    assert completion.usage.completion_tokens == 2


def test_cors_only_for_the_given_origin(keyed_server):
    url, _, _ = keyed_server
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{url}{CHAT}", headers={"Origin": "http://allowed.example", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://allowed.example"
    other = httpx.options(f"{url}{CHAT}", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_access_log_and_graceful_shutdown(keyed_server):
    url, process, log = keyed_server
    assert httpx.get(f"{url}/health").status_code == 200
    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so supervisors see how it ended
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert re.search(r'"POST /v1/chat/completions" 200 tokens=\d+\+2 \d+\.\d+s', text), text
    assert re.search(r'"GET /v1/models" 401 tokens=- ', text), text
    assert "the-secret-prompt-text" not in text, "prompts stay out of the log without --log-prompts"
    assert "Application shutdown complete" in text and "Finished server process" in text


def test_web_page_mounted_beside_the_api_behind_its_own_login(demo_chat):
    with live_server(create_app(demo_chat, ServerOptions(web=True, api_key=KEY))) as url:
        page = httpx.get(f"{url}/web/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert httpx.get(f"{url}/web/config").status_code == 401  # Gradio's login, not the Bearer header
        assert httpx.post(f"{url}/web/login", data={"username": "u", "password": "wrong"}).status_code == 400
        assert httpx.post(f"{url}/web/login", data={"username": "u", "password": KEY}).json() == {"success": True}
        assert openai_error(httpx.get(f"{url}/v1/models"), 401)
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# -- last: the main server survived everything above ----------------------------------------------
def test_server_still_answers(server, greedy_france):
    body = httpx.post(f"{server}/", json={"prompt": FRANCE, "temperature": 0}, timeout=300).json()
    assert body["response"] == greedy_france.strip()


# -- what a browser finds -----------------------------------------------------------------------------
HTML = {"Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"}


def test_a_browser_at_the_root_gets_a_page_and_post_stays_the_contract(server, greedy_france):
    page = httpx.get(f"{server}/", headers=HTML)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for endpoint in ("/v1/chat/completions", "/v1/models", "/health", "/docs", "--web"):
        assert endpoint in page.text
    # an API client asking GET still learns that the contract is POST
    error = openai_error(httpx.get(f"{server}/"), 405)
    assert "POST" in error["message"]
    answer = httpx.post(f"{server}/", json={"prompt": FRANCE, "history": [], "temperature": 0}, timeout=300).json()
    assert answer["status"] == 200 and "Paris" in answer["response"]


def test_docs_page_and_favicon_need_no_other_host(server):
    docs = httpx.get(f"{server}/docs", headers=HTML)
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in docs.text
    assert not re.search(r"""(src|href)=["']?https?://""", docs.text), "the page loads nothing from other hosts"
    icon = httpx.get(f"{server}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.content.startswith(b"<svg")
    assert "/docs" not in httpx.get(f"{server}/openapi.json").json()["paths"], "the pages are not API routes"


def test_the_root_redirects_to_the_chat_page_and_stays_open_under_a_key(demo_chat):
    with live_server(create_app(demo_chat, ServerOptions(web=True, api_key=KEY))) as url:
        page = httpx.get(f"{url}/", headers=HTML)
        assert page.status_code == 307 and page.headers["location"] == "/web/"
        assert httpx.get(f"{url}/", headers=HTML, follow_redirects=True).status_code == 200
        assert httpx.get(f"{url}/docs").status_code == 200
        assert httpx.get(f"{url}/favicon.ico").status_code == 200
        assert openai_error(httpx.post(f"{url}/", json={"prompt": "hi"}), 401)["code"] == "invalid_api_key"
