"""The ``glmkit`` command as a user runs it: one-shot, piped, the interactive REPL in a pseudo-terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect
import pytest

GLMKIT = [sys.executable, "-m", "glmkit"]


def run(*args: str, stdin: str | None = None, env: dict | None = None, timeout: int = 180):
    return subprocess.run(
        [*GLMKIT, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_one_shot_answers_paris():
    result = run("chat", "-q", "What is the capital of France?", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_piped_stdin_is_one_question():
    result = run("chat", "--temperature", "0", "--max-new-tokens", "30", stdin="What is the capital of France?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["-m", "/no/such/model"], {}, "not a directory"),
        (["-m", "no-such-org/no-such-model"], {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        (["--device", "cuda"], {}, "no CUDA GPU"),
        (["--dtype", "fp8"], {}, "unknown dtype"),
        (["--template", "nope"], {}, "unknown template"),
    ],
)
def test_user_mistakes_are_one_clear_line(args, env, message):
    result = run("chat", *args, "-q", "hi", env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_env():
    assert run("--version").stdout.startswith("glmkit ")
    report = run("env").stdout
    for key in ("torch", "transformers", "cuda available", "mps available", "demo model"):
        assert key in report


def test_repl_clear_stop_and_ctrl_c(tmp_path):
    child = pexpect.spawn(
        sys.executable,
        ["-m", "glmkit", "chat", "--temperature", "0"],
        encoding="utf-8",
        timeout=120,
        env={**os.environ, "TERM": "xterm"},
        dimensions=(40, 200),
    )
    child.logfile_read = (tmp_path / "repl.log").open("w")
    try:
        child.expect("'clear' empties the history")
        child.expect("You: ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect("You: ")
        # Ctrl-C cuts a long answer and returns to the prompt with the session intact
        child.sendline("Write a very long essay about the history of Europe, with many details.")
        child.expect("SmolLM2|Instruct")  # the reply has started
        child.sendintr()
        child.expect(r"\[answer stopped\]")
        child.expect("You: ")
        child.sendline("And of Germany?")
        child.expect("Berlin")  # follows from the first turn: the history survived
        child.expect("You: ")
        child.sendline("clear")
        child.expect("\x1b\\[2J")
        child.expect("'clear' empties the history")
        child.expect("You: ")
        child.sendline("stop")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_repl_ctrl_d_quits():
    child = pexpect.spawn(sys.executable, ["-m", "glmkit", "chat"], encoding="utf-8", timeout=120)
    child.expect("You: ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
