"""The ``glmkit`` command as a user runs it: one-shot, piped, the interactive REPL in a pseudo-terminal."""

from __future__ import annotations

import json
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
        child.expect("Ctrl-C cuts a reply short")
        child.expect("Ctrl-D quits")
        child.expect("You: ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect("You: ")
        # Ctrl-C cuts a long answer and returns to the prompt with the session intact
        child.sendline("Write a very long essay about the history of Europe, with many details.")
        child.expect("SmolLM2|Instruct")  # the reply has started
        child.sendintr()
        child.expect(r"\[answer stopped: kept in the conversation\]")
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


# -- broken model directories and bad input: one 'error:' line, exit 2 -------------------------------
def _broken_copy(tmp_path, name: str, replace: str, content: str):
    """The demo model's files, linked, with ``replace`` written anew (weights are never copied)."""
    from glmkit.demo_model import demo_model_dir

    folder = tmp_path / name
    folder.mkdir()
    for item in demo_model_dir().iterdir():
        if item.name != replace:
            (folder / item.name).symlink_to(item)
    (folder / replace).write_text(content, encoding="utf-8")
    return folder


def _config_with(**changes) -> str:
    from glmkit.demo_model import demo_model_dir

    config = json.loads((demo_model_dir() / "config.json").read_text())
    return json.dumps({**config, **changes})


BROKEN_MODELS = [
    ("config_list", "config.json", lambda: "[1, 2, 3]", "must hold a JSON object"),
    ("config_empty", "config.json", lambda: "{}", "has no model_type"),
    ("model_type_number", "config.json", lambda: _config_with(model_type=5), "model_type must be a string"),
    ("layers_text", "config.json", lambda: _config_with(num_hidden_layers="thirty"), "num_hidden_layers"),
    ("hidden_negative", "config.json", lambda: _config_with(hidden_size=-1), "hidden_size"),
    ("vocab_null", "config.json", lambda: _config_with(vocab_size=None), "vocab_size"),
    ("tokenizer_class_number", "tokenizer_config.json", lambda: '{"tokenizer_class": 5}', "tokenizer_class"),
    ("generation_hot", "generation_config.json", lambda: '{"temperature": "hot"}', "temperature"),
    (
        "remote_code",
        "config.json",
        lambda: '{"model_type": "mystery", "auto_map": {"AutoConfig": "m.C"}}',
        "never runs",
    ),
]


@pytest.mark.parametrize(("name", "replace", "content", "message"), BROKEN_MODELS, ids=[b[0] for b in BROKEN_MODELS])
@pytest.mark.parametrize("verb", ["chat", "serve"])
def test_broken_model_directories_are_one_error_line(tmp_path, verb, name, replace, content, message):
    folder = _broken_copy(tmp_path, name, replace, content())
    args = ["-q", "hi"] if verb == "chat" else ["--port", "0"]
    result = run(verb, "-m", str(folder), *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "trust_remote_code" not in result.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--seed", str(2**64), "--temperature", "1", "-q", "hi"], None, "seed must be"),
        (["--temperature", "inf", "-q", "hi"], None, "temperature must be a finite number"),
        (["--stop", "x" * 300, "-q", "hi"], None, "stop string"),
        ([b"-q", b"\xff\xfe"], None, "not UTF-8"),
        ([], b"\x00\xff\xfe binary \x80", "standard input is not UTF-8"),
    ],
)
def test_bad_cli_input_is_one_error_line(args, stdin, message):
    result = subprocess.run([*GLMKIT, "chat", *args], input=stdin, capture_output=True, timeout=180)
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], stderr


def test_a_tiny_temperature_answers_greedily():
    tiny = run("chat", "-q", "What is the capital of France?", "--temperature", "1e-300", "--max-new-tokens", "8")
    greedy = run("chat", "-q", "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "8")
    assert tiny.returncode == 0, tiny.stderr
    assert tiny.stdout == greedy.stdout


# -- mistakes are told before anything is downloaded, converted or loaded ----------------------------
EARLY_MISTAKES = [
    (["--template", "llama"], "unknown template 'llama'"),
    (["--adapter", "/no/such/adapter"], "the adapter /no/such/adapter is not a directory"),
    (["--ptuning-checkpoint", "/no/such/ckpt"], "the P-Tuning checkpoint /no/such/ckpt is not a directory"),
    (["--quantize", "5"], "quantize to 4 or 8 bits, not 5"),
    (["--source", "elsewhere"], "unknown model source 'elsewhere'"),
    (["--dtype", "fp8"], "unknown dtype"),
]


@pytest.mark.parametrize(("args", "message"), EARLY_MISTAKES, ids=[a[0][0] for a in EARLY_MISTAKES])
@pytest.mark.parametrize("verb", ["chat", "serve", "web"])
def test_mistakes_are_told_before_the_model_is_prepared(tmp_path, verb, args, message):
    cache = tmp_path / "cache"  # an empty glmkit cache: the demo model would be converted into it first
    extra = ["-q", "hi"] if verb == "chat" else ["--port", "0"]
    result = run(verb, *args, *extra, env={"GLMKIT_CACHE": str(cache)}, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not cache.exists(), "the demo model was prepared before the mistake was found"


@pytest.mark.parametrize("verb", ["serve", "web"])
def test_a_busy_port_is_one_error_line_before_loading(tmp_path, verb):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cache = tmp_path / "cache"
        result = run(verb, "--port", str(port), env={"GLMKIT_CACHE": str(cache)}, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is already in use: stop what uses it or pick --port"
    )
    assert not cache.exists()


# -- help texts -------------------------------------------------------------------------------------
def test_help_shows_flags_without_values_real_defaults_and_examples():
    for verb in ("chat", "serve", "web", "eval", "quantize", "train", "export", "env", "download", "models"):
        result = run(verb, "--help", env={"COLUMNS": "200"})
        assert result.returncode == 0, result.stderr
        assert "<bool>" not in result.stdout and "<list[" not in result.stdout, (verb, result.stdout)
        assert "Examples:" in result.stdout and f"glmkit {verb}" in result.stdout.split("Examples:")[1], verb
    chat_help = run("chat", "--help", env={"COLUMNS": "200"}).stdout
    for text in ("default 512", "default 0.8, or the checkpoint's own", "--top-p", "--top-k", "--repetition-penalty"):
        assert text in chat_help


def test_every_example_in_the_help_parses():
    """Each example's verb and flags exist: parsed as the command line would be (--help ends it there)."""
    import shlex

    from typer.testing import CliRunner

    from glmkit.cli import EXAMPLES, app

    runner = CliRunner()
    for rows in EXAMPLES.values():
        for command, _ in rows:
            words = shlex.split(command)
            words = words[words.index("glmkit") :]  # after VAR=value prefixes
            result = runner.invoke(app, [*words[1:], "--help"])
            assert result.exit_code == 0, (command, result.output)


class _Terminal:
    """Standard output as the REPL writes to it; Ctrl-C arrives after ``interrupt_after`` writes."""

    def __init__(self, interrupt_after: int) -> None:
        self.text, self.left = "", interrupt_after

    def write(self, text: str) -> None:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        self.text += text

    def flush(self) -> None:
        pass


def test_ctrl_c_keeps_the_question_and_the_partial_answer(demo_chat):
    from glmkit.repl import CUT_MARK, stream_answer

    terminal = _Terminal(interrupt_after=6)
    story = "Write a very long essay about the history of Europe."
    response, history = stream_answer(
        demo_chat, story, [], terminal, keep_cut=True, temperature=0, max_new_tokens=200
    )
    assert terminal.text.endswith(f"\n{CUT_MARK}\n")
    assert len(history) == 1 and history[0][0] == story
    assert history[0][1] == response and response.startswith(terminal.text.split("\n")[0]) and response
    whole, _ = demo_chat.chat(story, [], temperature=0, max_new_tokens=200)
    assert whole.startswith(response) and len(response) < len(whole)  # cut, not finished
    with pytest.raises(KeyboardInterrupt):  # without keep_cut (one question, -q) Ctrl-C ends the command
        stream_answer(demo_chat, story, [], _Terminal(interrupt_after=3), temperature=0)


# -- configuration without long command lines ---------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_reads_a_config_file_and_env_vars_and_flags_win(tmp_path):
    import time

    import httpx

    from glmkit.demo_model import demo_model_dir

    file_port, flag_port = _free_port(), _free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(f"port: {file_port}\nweb: true\nmax_active: 1\nmax_queue: 0\nhost: 0.0.0.0\n", encoding="utf-8")
    env = {**os.environ, "GLMKIT_MODEL": str(demo_model_dir()), "GLMKIT_HOST": "127.0.0.1"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [*GLMKIT, "serve", "--config", str(config), "--port", str(flag_port)], env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{flag_port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == str(demo_model_dir())  # GLMKIT_MODEL
        assert httpx.get(f"{url}/web/", timeout=30).status_code == 200  # web: true from the file
        text = (tmp_path / "serve.log").read_text()
        assert f"http://127.0.0.1:{flag_port}/web/" in text and "listening on 0.0.0.0" not in text  # env won
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_a_bad_config_file_is_one_error_line(tmp_path):
    config = tmp_path / "serve.yaml"
    for content, message in [
        ("max_active: 0\n", "serve.yaml: max_active:"),
        ("nope: 1\n", "unknown settings nope"),
        ("- a list\n", "must hold a mapping"),
    ]:
        config.write_text(content, encoding="utf-8")
        result = run("serve", "--config", str(config), env={"GLMKIT_CACHE": str(tmp_path / "cache")}, timeout=60)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "cache").exists()


def test_threads_flag_and_the_servers_default(tmp_path):
    """The loading line on a terminal names the CPU threads: --threads, else torch's default for chat."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "glmkit", "chat", "-q", "Hi", "--max-new-tokens", "1", "--threads", "1"],
        encoding="utf-8",
        timeout=120,
        env={**os.environ, "TERM": "xterm"},
    )
    child.expect(r"Loading SmolLM2-135M-Instruct on cpu as float32 \(1 CPU thread\)…")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert run("chat", "--threads", "0", "-q", "hi").returncode == 2
    half = max(1, (os.cpu_count() or 1) // 2)
    server = pexpect.spawn(
        sys.executable, ["-m", "glmkit", "serve", "--port", "0"], encoding="utf-8", timeout=120, env=os.environ
    )
    try:
        server.expect(rf"on cpu as float32 \({half} CPU thread")
        server.expect("Ready in")
    finally:
        server.terminate(force=True)
