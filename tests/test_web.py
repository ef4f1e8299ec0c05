"""The browser chat: safe Markdown and character cards, then the real page in headless Chromium.

``glmkit web`` runs in a subprocess on a free loopback port with the demo model; the page is driven
with Playwright's Python API on Debian's Chromium (never a downloaded browser).  A second server in
a thread mounts ``build_web`` under FastAPI at /web, as ``glmkit serve --web`` does, beside pages
whose scheduler is scripted (exact replies with HTML in them, a full queue, a CharacterGLM card).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from glmkit.engine import Chunk, GenerationConfig
from glmkit.engine.scheduler import QueueFull
from glmkit.errors import GlmkitError
from glmkit.templates.characterglm import read_card
from glmkit.web.app import render, safe_markdown
from glmkit.web.character_cards import EXAMPLE_CARDS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
QUESTION = "What is the capital of France?"
# the Chatbot's status tracker loses "hide" while an answer is pending or streaming
CHAT_IDLE = "#chat [data-testid=status-tracker].hide"

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install chromium)"
)


# -- without a browser ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("<script>alert(1)</script>", "&lt;script>alert(1)&lt;/script>"),
        ('<img src=x onerror="alert(1)">', '&lt;img src=x onerror="alert(1)">'),
        ("<!-- hidden --> &lt;b&gt;", "&lt;!-- hidden --> &amp;lt;b&amp;gt;"),
        ("a < b && AT&T", "a < b && AT&T"),  # nothing that could start HTML: left as typed
        ("use `<b>` here", "use `<b>` here"),  # code spans are escaped by the Markdown renderer
        ("``a ` <b>`` <b>", "``a ` <b>`` &lt;b>"),
        ("```html\n<b>x</b>\n```\n<b>", "```html\n<b>x</b>\n```\n&lt;b>"),
        ("~~~\n<b>x</b>\n~~~", "~~~\n<b>x</b>\n~~~"),
        ("```py\nif a <b:", "```py\nif a <b:"),  # a fence still open while the reply streams
    ],
)
def test_safe_markdown_escapes_html_outside_code(text, shown):
    assert safe_markdown(text) == shown


def test_render_puts_the_greeting_first_and_shows_tool_calls_as_json():
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "metadata": "get_weather", "content": {"name": "get_weather", "parameters": {}}},
    ]
    shown = render(history, greeting="Hello <there>")
    assert shown[0] == {"role": "assistant", "content": "Hello &lt;there>"}
    assert shown[1] == {"role": "user", "content": "weather?"}
    assert shown[2]["content"].startswith("```json\n{")
    assert render([{"role": "system", "content": "x"}]) == []


def test_read_card(tmp_path):
    good = tmp_path / "card.json"
    good.write_text('{"bot_name": "A", "user_name": "B", "bot_info": "kind"}', encoding="utf-8")
    assert read_card(good) == {"bot_name": "A", "user_name": "B", "bot_info": "kind", "user_info": "", "greeting": ""}
    bad = tmp_path / "bad.json"
    for text in ('{"bot_name": "A"}', "[1]", "{not json"):
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(GlmkitError):
            read_card(bad)


# -- servers and the browser ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, alive, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert alive(), "the server stopped before it answered"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def web_server(tmp_path_factory) -> Iterator[str]:
    """``glmkit web`` as a user starts it, on a free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("web") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "glmkit", "web", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/", lambda: proc.poll() is None)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(log.read_text(encoding="utf-8")[-3000:])  # shown by pytest when a test failed


class ScriptedScheduler:
    """Stands in for the Scheduler: answers with a set text in small pieces, or raises a set error,
    and keeps the prompts it was given."""

    context_length = 2048

    def __init__(self) -> None:
        self.reply: str | Exception = "ok"
        self.pause = 0.01  # seconds between pieces
        self.prompts: list[list[int]] = []
        self.ended = 0  # streams that are over, finished or cancelled

    async def stream(self, prompt_ids: list[int], config: GenerationConfig) -> AsyncIterator[Chunk]:
        self.prompts.append(prompt_ids)
        try:
            if isinstance(self.reply, Exception):
                raise self.reply
            for start in range(0, len(self.reply), 8):
                await asyncio.sleep(self.pause)
                yield Chunk(self.reply[start : start + 8])
            yield Chunk("", finish_reason="stop")
        finally:
            self.ended += 1


@pytest.fixture(scope="module")
def mounted(demo_chat) -> Iterator[tuple[str, ScriptedScheduler, ScriptedScheduler]]:
    """A FastAPI app, as ``glmkit serve --web`` builds it: the real page at /web, scripted ones beside it."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from glmkit.chat import ChatModel
    from glmkit.engine.scheduler import Scheduler
    from glmkit.templates import get_template
    from glmkit.web.app import build_web

    scheduler, scripted, character = Scheduler(demo_chat.engine), ScriptedScheduler(), ScriptedScheduler()
    # a CharacterGLM page: the demo weights and tokenizer under the CharacterGLM template (nothing is generated)
    role_play = ChatModel(demo_chat.model, demo_chat.tokenizer, get_template("characterglm"), name="role-play")
    app = FastAPI()
    app = gr.mount_gradio_app(app, build_web(demo_chat, scheduler), path="/web")
    app = gr.mount_gradio_app(app, build_web(demo_chat, scripted), path="/scripted")
    app = gr.mount_gradio_app(app, build_web(role_play, character), path="/character")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until_up(f"http://127.0.0.1:{port}/web/", thread.is_alive)
        yield f"http://127.0.0.1:{port}", scripted, character
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        scheduler.close()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh tab that refuses, and lists in ``page.outside``, any request to a host but 127.0.0.1."""
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    tab = context.new_page()
    tab.outside = []

    def loopback_only(route):
        if urlparse(route.request.url).hostname == "127.0.0.1" or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            tab.outside.append(route.request.url)
            route.abort()

    context.route("**/*", loopback_only)
    tab.set_default_timeout(60_000)
    yield tab
    context.close()


def open_chat(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#message textarea")


def set_number(page, elem_id: str, value: str) -> None:
    """Type into a slider's number box, as a user does."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")
    assert page.locator(f"#{elem_id} input[type=range]").input_value() == value


def send(page, text: str) -> None:
    """Send ``text`` and wait until the answer to it has finished streaming."""
    users = page.locator("[data-testid=user]").count()
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")
    page.locator("[data-testid=user]").nth(users).wait_for()  # the turn has started: the tracker is busy
    page.wait_for_selector(CHAT_IDLE, state="attached")


def messages(page, role: str) -> list[str]:
    return page.locator(f"[data-testid={role}]").all_inner_texts()


# Each change of the last reply, as the browser showed it; installed before sending.
RECORD_REPLIES = """() => {
  window.replyStates = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#chat [data-testid=bot]');
    const text = bots.length ? bots[bots.length - 1].innerText : '';
    if (text && window.replyStates[window.replyStates.length - 1] !== text) window.replyStates.push(text);
  }).observe(document.querySelector('#chat'), {childList: true, subtree: true, characterData: true});
}"""


@needs_chromium
def test_chat_streams_keeps_history_and_clears(web_server, page):
    open_chat(page, web_server)
    assert "SmolLM2-135M-Instruct" in page.title()
    set_number(page, "temperature", "0")
    page.evaluate(RECORD_REPLIES)

    send(page, QUESTION)
    answer = messages(page, "bot")[-1]
    assert "Paris" in answer
    states = page.evaluate("window.replyStates")
    partial = [s for s in states if s.strip() and s.strip() != answer.strip()]
    assert partial, f"no partial reply was shown before the whole one: {states}"
    assert all(answer.startswith(s.strip()) for s in partial), states
    assert messages(page, "user") == [QUESTION]

    send(page, "And what is the capital of Germany?")
    assert len(messages(page, "user")) == 2
    assert len(messages(page, "bot")) == 2 and messages(page, "bot")[-1].strip()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

    page.click("#clear")
    page.locator("[data-testid=user]").first.wait_for(state="detached")
    assert messages(page, "user") == messages(page, "bot") == []
    send(page, QUESTION)  # the cleared conversation starts afresh: the greedy answer is the same
    assert messages(page, "bot") == [answer]
    assert page.outside == []


@needs_chromium
def test_page_mounted_under_fastapi_answers(mounted, page):
    base, _, _ = mounted
    open_chat(page, f"{base}/web/")
    assert "SmolLM2-135M-Instruct" in page.title()
    set_number(page, "temperature", "0")
    send(page, QUESTION)
    assert "Paris" in messages(page, "bot")[-1]
    assert page.outside == []


@needs_chromium
def test_errors_are_warnings_in_the_page(mounted, page):
    base, scripted, _ = mounted
    open_chat(page, f"{base}/web/")
    set_number(page, "max_length", "5")  # shorter than any prompt
    page.fill("#message textarea", QUESTION)
    page.press("#message textarea", "Enter")
    page.get_by_text("leaves no room").wait_for()
    assert messages(page, "user") == []  # the turn is taken back and the message is kept to edit
    assert page.input_value("#message textarea") == QUESTION

    scripted.reply = QueueFull("80 requests are already running or queued")
    open_chat(page, f"{base}/scripted/")
    page.fill("#message textarea", "Hello")
    page.press("#message textarea", "Enter")
    page.get_by_text("The server is busy").wait_for()
    assert page.input_value("#message textarea") == "Hello"
    assert page.outside == []


@needs_chromium
def test_stop_cancels_the_reply_and_keeps_what_was_shown(mounted, demo_chat, page):
    base, scripted, _ = mounted
    scripted.reply, scripted.pause = "word " * 400, 0.1  # 40 s if nothing stops it
    open_chat(page, f"{base}/scripted/")
    ended = scripted.ended
    page.fill("#message textarea", "Talk for a long time")
    page.press("#message textarea", "Enter")
    page.get_by_text("word word word").wait_for()
    page.click("#stop")
    page.wait_for_selector(CHAT_IDLE, state="attached", timeout=10_000)
    deadline = time.monotonic() + 10
    while scripted.ended == ended and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scripted.ended == ended + 1, "the scheduler's stream was not closed"
    shown = messages(page, "bot")[-1]
    time.sleep(0.5)
    assert messages(page, "bot")[-1] == shown and 0 < len(shown) < len(scripted.reply.strip())
    scripted.reply, scripted.pause = "next answer", 0.01
    send(page, "Go on")
    assert messages(page, "bot") == [shown, "next answer"]  # the cut reply stays in the conversation
    assert shown.strip() in demo_chat.tokenizer.decode(scripted.prompts[-1])  # and the model reads it


@needs_chromium
def test_two_tabs_are_answered_at_once(mounted, page):
    base, scripted, _ = mounted
    scripted.reply, scripted.pause = "tick " * 30, 0.1  # 2 s of streaming per reply
    other = page.context.new_page()
    for tab in (page, other):
        open_chat(tab, f"{base}/scripted/")
    for tab in (page, other):
        tab.fill("#message textarea", "Count")
        tab.press("#message textarea", "Enter")
    for tab in (page, other):  # both stream before either has finished: Gradio's queue does not serialize them
        tab.get_by_text("tick tick").wait_for()
    assert all(
        len(tab.locator("[data-testid=bot]").last.inner_text()) < len(scripted.reply.strip()) for tab in (page, other)
    )
    scripted.pause = 0.01


@needs_chromium
def test_an_empty_reply_is_a_turn_of_the_conversation(mounted, demo_chat, page):
    base, scripted, _ = mounted
    open_chat(page, f"{base}/scripted/")
    scripted.reply = ""
    send(page, "first")
    scripted.reply = "second"
    send(page, "again")
    earlier = [{"role": "user", "content": "first"}, {"role": "assistant", "content": ""}]
    assert scripted.prompts[-1] == demo_chat.encode(demo_chat.build_messages("again", earlier))


@needs_chromium
def test_html_in_replies_is_shown_as_text(mounted, page):
    base, scripted, _ = mounted
    scripted.reply = (
        'Look: <script>window.pwned = 1</script> <img src=x onerror="window.pwned = 2"> **bold**\n\n'
        "```html\n<b>not bold</b>\n```"
    )
    open_chat(page, f"{base}/scripted/")
    send(page, '<img src=y onerror="window.pwned = 3">')
    bot = page.locator("[data-testid=bot]").last
    assert "<script>window.pwned = 1</script>" in bot.inner_text()
    assert '<img src=x onerror="window.pwned = 2">' in bot.inner_text()
    assert bot.locator("strong").inner_text() == "bold"  # Markdown still renders
    assert bot.locator("pre code").inner_text().strip() == "<b>not bold</b>"
    assert '<img src=y onerror="window.pwned = 3">' in messages(page, "user")[-1]
    assert page.locator("#chat img, #chat script").count() == 0
    assert page.evaluate("window.pwned") is None
    assert page.outside == []


@needs_chromium
def test_character_card_greets_and_shapes_the_prompt(mounted, demo_chat, page, tmp_path):
    base, _, character = mounted
    first, second = EXAMPLE_CARDS.values()
    open_chat(page, f"{base}/character/")
    assert messages(page, "bot") == [first["greeting"]]  # the greeting is the first bot message
    assert page.locator("#system").count() == 0  # CharacterGLM has no system prompt: the card says it all

    page.get_by_label("Example cards").click()
    page.get_by_role("option", name=list(EXAMPLE_CARDS)[1]).click()
    page.get_by_text(second["greeting"]).wait_for()
    character.reply = "怀表在书房。"
    send(page, "你好")
    prompt = demo_chat.tokenizer.decode(character.prompts[-1])
    assert prompt.startswith(f"以下是一段{second['bot_name']}和{second['user_name']}之间的对话。")
    bot, user = second["bot_name"], second["user_name"]
    assert prompt.endswith(f"[{bot}]{second['greeting']}\n[{user}]你好\n[{bot}]")
    assert messages(page, "bot") == [second["greeting"], "怀表在书房。"]

    page.click("#clear")
    page.get_by_text("怀表在书房。").wait_for(state="detached")
    assert messages(page, "bot") == [second["greeting"]]

    card = tmp_path / "card.json"
    card.write_text('{"bot_name": "Ada", "user_name": "Bob", "greeting": "Hello, Bob."}', encoding="utf-8")
    page.locator("input[type=file]").set_input_files(card)
    page.get_by_text("Hello, Bob.").wait_for()
    assert messages(page, "bot") == ["Hello, Bob."]
    assert page.get_by_label("bot_info").input_value() == ""  # fields the file leaves out are emptied
    assert page.outside == []
