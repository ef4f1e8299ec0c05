"""``glmkit bench`` as a user runs it, on the CPU: a tiny random model of each GLM family and the demo model
beside transformers, the JSON and the docs section it writes, and the flags it refuses."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from glmkit.bench.report import END_MARKER, start_marker, write_docs
from glmkit.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def bench(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # one torch thread: two on a shared 2-core machine spin against other work (see glmkit.cli._set_threads)
    command = [sys.executable, "-m", "glmkit", "bench", "--quick", "--threads", "1", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result


def numbers(value: object) -> Iterator[float]:
    if isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield value


def check_figures(report: dict, streams: list[int]) -> None:
    """Every section is there and holds positive finite figures."""
    assert report["limits"]["copy_bandwidth_gb_s"] > 0 and report["limits"]["matrix_tflop_s"] > 0
    rows = {row["row"]: row for row in report["batch1"]}
    assert list(rows) == ["glmkit eager", "glmkit fast", "INT8", "INT4", "transformers"]
    assert "no fast mode on a CPU" in rows["glmkit fast"]["note"]
    for name in ("glmkit eager", "INT8", "INT4"):
        assert "error" not in rows[name], rows[name]
        assert rows[name]["tok_s"] > 0 and rows[name]["vs_limit"] > 0
    assert rows["INT4"]["weight_bytes"] < rows["INT8"]["weight_bytes"] < rows["glmkit eager"]["weight_bytes"]
    assert report["ttft"]["ms"] > 0 and report["ttft"]["vs_limit"] > 0
    assert report["ttft_under_load"]["ttft_ms"] > 0 and report["ttft_under_load"]["others"] == 3
    assert [s["streams"] for s in report["streams"]] == streams
    for result in report["streams"]:
        assert result["tok_s"] > 0 and 0 < result["itl_p50_ms"] <= result["itl_p99_ms"]
    assert all(math.isfinite(x) and x >= 0 for x in numbers(report))


@pytest.fixture(scope="module")
def glm_run(tmp_path_factory) -> tuple[Path, dict, str]:
    """A tiny ChatGLM3-family run writing JSON and its section into a copy of docs/benchmarks.md."""
    work = tmp_path_factory.mktemp("bench")
    (work / "docs").mkdir()
    shutil.copy(DOCS, work / "docs" / "benchmarks.md")
    result = bench(work, "--shape", "chatglm3-6b", "--json", "out.json")  # docs/benchmarks.md found by default
    return work, json.loads((work / "out.json").read_text()), result.stdout


def test_glm_shape_reports_every_figure(glm_run):
    _, report, stdout = glm_run
    assert report["shape"] == "chatglm3-6b-tiny" and report["device"] == "cpu"
    check_figures(report, [1, 4])
    transformers = report["batch1"][-1]
    assert transformers["note"].startswith("GlmForCausalLM") and transformers["tok_s"] > 0
    assert report["batch1"][0]["vs_transformers"] > 0 and report["ttft"]["transformers_ms"] > 0
    assert "| batch-1 decode, glmkit eager |" in stdout and "| 4 streams through the scheduler |" in stdout


def test_docs_section_is_appended_then_replaced(glm_run):
    work, report, _ = glm_run
    docs = work / "docs" / "benchmarks.md"
    original = DOCS.read_text(encoding="utf-8").rstrip("\n")
    text = docs.read_text(encoding="utf-8")
    assert text.startswith(original)  # the measured sections stay as they were
    assert text.count(start_marker(report)) == 1 and text.rstrip().endswith(END_MARKER)
    assert "glmkit bench --quick --threads 1 --shape chatglm3-6b --json out.json" in text
    # a later run of the same device and shape replaces its section, whatever came after it
    docs.write_text(text + "\n## Later notes\n", encoding="utf-8")
    write_docs(docs, {**report, "date": "a later run"})
    again = docs.read_text(encoding="utf-8")
    assert again.count(start_marker(report)) == 1 and again.count(END_MARKER) == original.count(END_MARKER) + 1
    assert "a later run" in again and report["date"] not in again and again.endswith("## Later notes\n")


def test_the_section_tells_each_figures_seconds(glm_run):
    work, report, _ = glm_run
    assert report["complete"] and list(report["seconds"])[:2] == ["limits", "batch-1 glmkit eager"]
    assert "streams 4" in report["seconds"] and all(s >= 0 for s in report["seconds"].values())
    text = (work / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "Seconds per figure, compilation included: limits " in text and "The run stopped there" not in text


def test_a_run_killed_part_way_keeps_what_it_measured(tmp_path):
    command = [sys.executable, "-m", "glmkit", "bench", "--quick", "--threads", "1", "--shape", "chatglm3-6b",
               "--json", "out.json", "--docs", "bench.md"]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out.json"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (out.exists() and json.loads(out.read_text()).get("batch1")):
            time.sleep(0.05)
        process.kill()  # as a time limit does: no chance to write anything more
    finally:
        process.wait(timeout=60)
    report = json.loads(out.read_text())  # whole: each write replaced the last
    assert not report["complete"] and report["batch1"][0]["tok_s"] > 0
    text = (tmp_path / "bench.md").read_text(encoding="utf-8")
    assert "| batch-1 decode, glmkit eager |" in text and "The run stopped there" in text
    assert "streams through the scheduler" not in text and text.rstrip().endswith(END_MARKER)


def test_some_figures_only_get_a_section_of_their_own(glm_run):
    work, full, _ = glm_run
    bench(work, "--shape", "chatglm3-6b", "--figures", "streams", "--streams", "1", "--json", "some.json")
    report = json.loads((work / "some.json").read_text())
    assert report["complete"] and "batch1" not in report and "ttft" not in report
    assert [s["streams"] for s in report["streams"]] == [1] and report["streams"][0]["vs_transformers"] is None
    text = (work / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert start_marker(report) == "<!-- glmkit bench: cpu chatglm3-6b-tiny streams -->"
    assert text.count(start_marker(report)) == 1 and text.count(start_marker(full)) == 1  # the full run's stays


def test_chatglm6b_shape_has_no_transformers_number(tmp_path):
    bench(tmp_path, "--shape", "chatglm-6b", "--json", "out.json", "--streams", "1,4")
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["shape"] == "chatglm-6b-tiny" and report["config"]["vocab_size"] == 130528
    check_figures(report, [1, 4])
    transformers = report["batch1"][-1]
    assert "no transformers class" in transformers["note"] and "tok_s" not in transformers
    assert not (tmp_path / "docs").exists()  # no docs/benchmarks.md here: nothing written


def test_demo_model_beside_transformers(tmp_path):
    bench(tmp_path, "--json", "out.json", "--streams", "1,4")
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["shape"] == "demo" and report["dtype"] == "float32"
    check_figures(report, [1, 4])
    eager, transformers = report["batch1"][0], report["batch1"][-1]
    assert transformers["note"].startswith("LlamaForCausalLM")
    # the same fp32 weights of a real model: greedy decoding gives the same tokens
    assert transformers["agreement_with_eager"] == report["plan"]["new_tokens"] == len(eager["tokens"])
    assert transformers["tokens"] == eager["tokens"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "chatglm4"], "unknown shape 'chatglm4'"),
        (["--streams", "1,x"], "--streams must be a comma list"),
        (["--streams", "0,8"], "--streams must be a comma list"),
        (["--streams", ""], "--streams must be a comma list"),
        (["--docs", "d.md", "--no-docs"], "--docs and --no-docs together"),
        (["--figures", "batch1,speed"], "--figures must be a comma list of batch1, ttft, streams"),
        pytest.param(
            ["--shape", "glm4-9b"],
            "needs a CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused only without CUDA"),
        ),
    ],
)
def test_bad_flags_are_one_error_line(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["glmkit", "bench", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # refused before anything ran or was written


def test_ptuning_int4_script_trains_both_bases(tmp_path):
    """scripts/bench_ptuning_int4.py --tiny on the CPU: P-Tuning v2 steps over an INT4 and a float base."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_ptuning_int4.py"
    out = tmp_path / "out.json"
    command = [sys.executable, str(script), "--tiny", "--device", "cpu", "--warmup", "1", "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread, as bench() above
    result = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    int4, base = rows["int4"], rows["float"]
    for row in (int4, base):
        assert len(row["losses"]) == 3 and all(math.isfinite(loss) for loss in row["losses"]), row
        assert row["trainable_parameters"] == int4["trainable_parameters"] > 0  # the prefix encoder alone
    assert int4["quantized_linears"] == 8 and int4["int4_layouts"] == ["plain"]  # 2 layers x 4, trained unpacked
    assert base["quantized_linears"] == 0 and int4["weight_tensors_gib"] < base["weight_tensors_gib"]
    assert "| official INT4 claim |" in result.stdout


def test_ttft_under_load_takes_the_prefill_chunk():
    """The chunk a newcomer is prefilled in (scripts/bench_prefill_chunk.py compares them) reaches the
    scheduler: a 64-token prompt in chunks of 16 while 2 streams decode."""
    from glmkit.bench import measure
    from glmkit.bench.shapes import SHAPES, build, prompt, vocab_size

    shape = SHAPES["chatglm3-6b"].tiny()
    model = build(shape, torch.device("cpu"), torch.float32)
    vocab = vocab_size(model)
    result = measure.ttft_under_load(model, 2, lambda i: prompt(shape, 8, vocab, i), prompt(shape, 64, vocab, 7), 16)
    assert result["chunk"] == 16 and result["ttft_ms"] > 0
    assert result["others_itl_p99_ms_before"] > 0
