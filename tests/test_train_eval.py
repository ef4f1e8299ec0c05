"""``glmkit eval`` and the ``glmkit data`` verbs on the demo model and real ADGEN rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ADGEN, V1_DIR, V3_DIR, needs_conformance, needs_data
from typer.testing import CliRunner

from glmkit.cli import app
from glmkit.errors import GlmkitError
from glmkit.train.data import DataArgs, load_examples, load_tokenizer_and_template, tokenize_examples
from glmkit.train.evaluate import evaluate

DEV = ADGEN / "dev.json"


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@needs_data
def test_evaluate_batches_rows_and_writes_both_files(demo_chat, tmp_path, monkeypatch):
    sizes = []
    decode_rows = demo_chat.model.decode_rows

    def spy(input_ids, *args):
        sizes.append(input_ids.shape[0])  # requests decoded in one step
        return decode_rows(input_ids, *args)

    monkeypatch.setattr(demo_chat.model, "decode_rows", spy)
    args = DataArgs(max_rows=3)
    examples = load_examples(DEV, args)
    config = demo_chat.generation(do_sample=False, max_new_tokens=4)
    metrics = evaluate(demo_chat, examples, args, config, tmp_path / "out", batch_size=3, progress=False)

    assert max(sizes) > 1  # rows were generated together, not one by one
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert saved == metrics
    assert {"rouge-1", "rouge-2", "rouge-l", "bleu-4", "rows", "tokens_per_second"} <= set(saved)
    assert saved["rows"] == 3 and 3 <= saved["generated_tokens"] <= 12 and saved["tokens_per_second"] > 0
    assert all(0 <= saved[key] <= 100 for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"))
    predictions = read_lines(tmp_path / "out" / "generated_predictions.jsonl")
    assert [row["labels"] for row in predictions] == [example.response for example in examples]
    assert all(isinstance(row["predict"], str) for row in predictions)


@needs_data
@needs_conformance
@pytest.mark.parametrize(("directory", "template"), [(V1_DIR, "chatglm"), (V3_DIR, "chatglm3")])
def test_evaluate_tiny_chatglm_checkpoints(tmp_path, directory, template):
    """ChatGLM-6B (requests interleaved) and ChatGLM3 (one batch) through the official layouts' prompts."""
    import glmkit

    model_dir = tmp_path / "model"  # the official-format checkpoint beside its tokenizer, linked
    model_dir.mkdir()
    for file in [*(directory / "checkpoint").iterdir(), *(directory / "tokenizer").iterdir()]:
        (model_dir / file.name).symlink_to(file)
    chat_model = glmkit.load(model_dir, device="cpu")
    assert chat_model.template.name == template
    args = DataArgs(max_rows=3)
    config = chat_model.generation(do_sample=False, max_new_tokens=4)
    metrics = evaluate(chat_model, load_examples(DEV, args), args, config, tmp_path / "out", progress=False)
    assert metrics["rows"] == 3 and metrics["generated_tokens"] > 0
    assert len(read_lines(tmp_path / "out" / "generated_predictions.jsonl")) == 3


@needs_data
def test_eval_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "glmkit", "eval", "--data", str(DEV), "--output", str(tmp_path), "--max-rows", "2",
         "--max-new-tokens", "2", "--batch-size", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "rouge-1" in result.stdout
    assert json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))["rows"] == 2
    assert len(read_lines(tmp_path / "generated_predictions.jsonl")) == 2


@needs_data
def test_eval_refuses_an_adapter_folder_that_is_neither_kind(tmp_path):
    command = ["eval", "--data", str(DEV), "--output", str(tmp_path), "--adapter", str(tmp_path), "--max-rows", "2"]
    result = CliRunner().invoke(app, command)
    assert isinstance(result.exception, GlmkitError) and "LoRA adapter" in str(result.exception), result.output


@needs_data
def test_data_tokenize_writes_what_training_feeds(tmp_path):
    out = tmp_path / "tokens.jsonl"
    result = CliRunner().invoke(app, ["data", "tokenize", str(DEV), "--output", str(out), "--max-rows", "5"])
    assert result.exit_code == 0, result.output
    args = DataArgs(max_rows=5)
    tokenizer, template = load_tokenizer_and_template(None, args)
    expected = tokenize_examples(load_examples(DEV, args), tokenizer, template, args)
    assert read_lines(out) == list(expected)
    stats = expected.stats
    assert f"{stats.rows} rows (hf layout)" in result.output
    assert f"{stats.truncated} truncated, {len(stats.dropped)} dropped" in result.output


@needs_data
def test_data_inspect_report():
    result = CliRunner().invoke(app, ["data", "inspect", str(DEV), "--max-rows", "20", "--max-seq-length", "160"])
    assert result.exit_code == 0, result.output
    for text in ("format columns, 20 rows read", "template hf", "rows truncated", "tokens per row", "⟦"):
        assert text in result.output


def test_data_convert(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "output": "d"}]
    alpaca.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    runner = CliRunner()
    assert runner.invoke(app, ["data", "convert", str(alpaca), str(tmp_path / "a.jsonl")]).exit_code == 0
    assert read_lines(tmp_path / "a.jsonl") == rows

    sharegpt = tmp_path / "sg.json"
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    sharegpt.write_text(json.dumps([{"conversations": turns}]), encoding="utf-8")
    result = runner.invoke(app, ["data", "convert", str(sharegpt), str(tmp_path / "m.jsonl")])
    assert result.exit_code == 0 and "(messages)" in result.output
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert read_lines(tmp_path / "m.jsonl") == [{"messages": messages}]

    table = tmp_path / "t.csv"
    table.write_text("content,summary\nx,y\n", encoding="utf-8")
    assert runner.invoke(app, ["data", "convert", str(table), str(tmp_path / "t.jsonl")]).exit_code == 0
    assert read_lines(tmp_path / "t.jsonl") == [{"content": "x", "summary": "y"}]
    # converted files read back as the same examples
    assert load_examples(tmp_path / "m.jsonl", DataArgs())[0].messages == messages


def test_bad_row_is_one_error_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"content": "a", "summary": "b"}\n{"content": "a", "summary": ""}\n', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "glmkit", "data", "tokenize", str(path), "--output", str(tmp_path / "o.jsonl")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {path}:2: empty response") and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--format", "yaml"], ["--max-source-length", "1"]])
def test_bad_data_flags(tmp_path, args):
    result = CliRunner().invoke(app, ["data", "tokenize", __file__, "--output", str(tmp_path / "o"), *args])
    assert isinstance(result.exception, GlmkitError)
