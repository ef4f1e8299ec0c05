"""The terminal chat: streaming replies, ``clear`` / ``stop``, Ctrl-C to cut a reply short."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, TextIO

from glmkit.chat import ChatModel
from glmkit.errors import GlmkitError

CLEAR_WORDS = ("clear",)
QUIT_WORDS = ("stop", "exit", "quit")
CLEAR_SCREEN = "\033[2J\033[H"
CUT_MARK = "[answer stopped: kept in the conversation]"


def stream_answer(
    model: ChatModel, query: str, history: list, out: TextIO, keep_cut: bool = False, **options: Any
) -> tuple[str | Any, list]:
    """Print the reply as it streams; return the final response and history.

    ``keep_cut``: Ctrl-C ends the reply instead of raising; the question and what was answered so far
    stay in the history (as the web page's Stop keeps them) and the screen marks the reply as cut.
    """
    response: Any = ""
    shown = ""
    new_history = history
    try:
        for response, new_history in model.stream_chat(query, history, **options):  # noqa: B007 - kept after it
            text = response if isinstance(response, str) else str(response)
            # post-processing may rewrite earlier characters (ChatGLM punctuation); print only the new tail
            if text.startswith(shown):
                out.write(text[len(shown) :])
            else:
                out.write("\n" + text)
            out.flush()
            shown = text
    except KeyboardInterrupt:
        if not keep_cut:
            raise
        out.write(f"\n{CUT_MARK}\n")
        out.flush()
        return response, new_history
    out.write("\n")
    out.flush()
    return response, new_history


def run_repl(model: ChatModel, options: dict[str, Any], greeting: str | None = None, bot_name: str = "") -> None:
    with contextlib.suppress(ImportError):  # no readline on Windows
        import readline  # noqa: F401 - importing it gives input() line editing and history
    name = bot_name or model.name
    banner = (
        f"glmkit chat with {name}. Type a message; 'clear' empties the history, 'stop' quits.\n"
        "Ctrl-C cuts a reply short (the conversation keeps what was said), Ctrl-D quits."
    )

    def start() -> list:
        print(banner)
        if greeting:
            print(f"{name}: {greeting}")
        return []

    history = start()
    while True:
        try:
            query = input("\nYou: ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(type 'stop' or press Ctrl-D to quit)")
            continue
        except UnicodeDecodeError:
            print("(that line is not UTF-8 text; type it again)")
            continue
        if not query:
            continue
        if query.lower() in QUIT_WORDS:
            return
        if query.lower() in CLEAR_WORDS:
            sys.stdout.write(CLEAR_SCREEN)
            history = start()
            continue
        sys.stdout.write(f"\n{name}: ")
        sys.stdout.flush()
        try:
            _, history = stream_answer(model, query, history, sys.stdout, keep_cut=True, **options)
        except KeyboardInterrupt:  # a second Ctrl-C while the cut turn is being kept
            print(f"\n{CUT_MARK}")
        except GlmkitError as exc:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"\nerror: {exc}")
