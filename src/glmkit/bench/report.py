"""``glmkit bench``'s report: the table (Markdown, for the terminal and the docs alike) and the section of
docs/benchmarks.md it replaces between its markers."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

END_MARKER = "<!-- /glmkit bench -->"
FIGURES = ("batch1", "ttft", "streams")  # what a run measures, in this order (--figures picks some)
HEADER = ["figure", "value", "/ limit", "/ transformers", "peak GiB"]


def _number(value: float) -> str:
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:g}"


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per figure: what it is, its value, its ratio to the limit and to transformers, peak memory."""
    limits = report["limits"]
    rows = [
        ["copy bandwidth (read + written)", f"{_number(limits['copy_bandwidth_gb_s'])} GB/s", "", "", ""],
        [f"matrix rate ({limits['matrix_dtype']} matmul)", f"{limits['matrix_tflop_s']:g} TFLOP/s", "", "", ""],
    ]
    for row in report.get("batch1", []):
        name = f"batch-1 decode, {row['row']}"
        if "tok_s" in row:
            value = f"{_number(row['tok_s'])} tok/s (limit {_number(row['limit_tok_s'])})"
            rows.append([name, value, _x(row.get("vs_limit")), _x(row.get("vs_transformers")),
                         str(row.get("peak_gib", ""))])  # fmt: skip
        else:
            rows.append([name, row.get("error") or row["note"], "", "", ""])
    if "ttft" in report:
        rows += _ttft_rows(report)
    for result in report.get("streams", []):
        value = (f"{_number(result['tok_s'])} tok/s (decode phase {_number(result['decode_tok_s'])}), "
                 f"inter-token p50 / p99 {result['itl_p50_ms']} / {result['itl_p99_ms']} ms")  # fmt: skip
        count = result["streams"]
        rows.append([f"{count} stream{'s' if count > 1 else ''} through the scheduler", value, _x(result["vs_limit"]),
                     _x(result["vs_transformers"]), str(result.get("peak_gib", ""))])  # fmt: skip
    return rows


def _ttft_rows(report: dict[str, Any]) -> list[list[str]]:
    ttft = report["ttft"]
    tokens = f"{ttft['prompt_tokens']:,}-token prompt"
    rows = [[f"time to first token, {tokens}, alone", f"{ttft['ms']} ms (limit {ttft['limit_ms']} ms)",
             _x(ttft["vs_limit"]), _x(ttft["vs_transformers"]) or ttft["transformers_note"],
             str(ttft.get("peak_gib", ""))]]  # fmt: skip
    loaded = report.get("ttft_under_load")
    if loaded is None:
        return rows
    rows.append([f"time to first token, {tokens}, while {loaded['others']} streams decode",
                 f"{loaded['ttft_ms']} ms", _x(loaded["vs_limit"]), "", str(loaded.get("peak_gib", ""))])  # fmt: skip
    during = loaded["others_itl_p99_ms_during"] or "n/a"  # none: no stream had two tokens in that window
    rows.append(["their inter-token p99 before / while it is prefilled",
                 f"{loaded['others_itl_p99_ms_before']} / {during} ms", "", "", ""])  # fmt: skip
    return rows


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    return "\n".join(lines)


def notes(report: dict[str, Any]) -> str:
    """What the ratios mean, said once under the table."""
    plan = report["plan"]
    memory = (
        "peak GiB: the figure's weights plus the most memory allocated while it ran above what was resident "
        "when it began (`torch.cuda.max_memory_allocated`, reset before each figure): what it needs alone, "
        "without the bf16 model that the INT8/INT4 rows keep for the later ones"
        if report["device"] == "cuda"
        else "peak GiB: not per figure on a CPU"
        + (f"; the process's RSS high-water mark over the run was {report['rss_high_water_gib']} GiB"
           if "rss_high_water_gib" in report else "")  # read at the end of a run
    )  # fmt: skip
    return (
        f"Batch 1: a {plan['prompt_tokens']}-token prompt, {plan['new_tokens']} new tokens, greedy, median of "
        f"{plan['repeats']} after a warm-up run, tok/s from the first token to the last. The batch-1 limit is the "
        "copy bandwidth over the bytes of weights the row reads each token; a prompt's limit is 2 x parameters "
        "FLOPs a token at the matrix rate (attention left out); streams' limit is the lesser of streams x the "
        "batch-1 limit and the matrix rate's tokens/s, and their ratio is the decode phase's (once every stream "
        "has its first token). / transformers: tok/s over transformers' batch-1 tok/s (for streams, the "
        "aggregate over it), and for the first token transformers' time over glmkit's. "
        f"{memory}."
    )


def section(report: dict[str, Any]) -> str:
    """The docs section of one run, between its markers."""
    config = ", ".join(f"{k} {v}" for k, v in report["config"].items()) or "the bundled demo model's own weights"
    size = (f"{report['parameters']:,} parameters ({report['weight_bytes'] / 1e9:.3g} GB of weights); "
            if "parameters" in report else "")  # fmt: skip
    return "\n".join([
        start_marker(report),
        f"### `glmkit bench`: {report['shape']} on {report['device_name']}",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        f"{report['date']}; glmkit {report['glmkit']}, torch {report['torch']}, transformers "
        f"{report['transformers']}, torch threads: {report['torch_threads']}; {report['dtype']}, {size}{config}.",
        "",
        markdown_table(report),
        "",
        notes(report),
        "",
        seconds(report),
        END_MARKER,
    ])  # fmt: skip


def seconds(report: dict[str, Any]) -> str:
    """How long each figure took, and whether the run got to the end."""
    took = ", ".join(f"{figure} {s:g}" for figure, s in report["seconds"].items())
    end = "" if report["complete"] else " The run stopped there: the figures missing from the table were not reached."
    return f"Seconds per figure, compilation included: {took}.{end}"


def start_marker(report: dict[str, Any]) -> str:
    """A run's section is its device kind's and shape's; one of some figures only (``--figures``) has its own."""
    figures = report["plan"]["figures"]
    some = "" if tuple(figures) == FIGURES else " " + ",".join(figures)
    return f"<!-- glmkit bench: {report['device']} {report['shape']}{some} -->"


def write_docs(path: Path, report: dict[str, Any]) -> None:
    """Replace the run's section of ``path`` (same device kind and shape) or append it at the end."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    new = section(report)
    pattern = re.compile(re.escape(start_marker(report)) + r".*?" + re.escape(END_MARKER), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _match: new, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + new
    write_whole(path, text.rstrip("\n") + "\n")


def write_whole(path: Path, text: str) -> None:
    """Write ``text`` beside ``path``, then rename it over: a run killed while writing leaves the last
    whole file, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
