"""``glmkit data inspect``: what a data file becomes for a model, as a rich report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from glmkit.train.examples import DataArgs, Examples
from glmkit.train.layouts import IGNORE, TokenizedRows

SHOWN_PROBLEMS = 5  # bad, dropped rows listed by name; the rest are counted


def histogram(lengths: Sequence[int], bins: int = 8) -> list[tuple[int, int, int]]:
    """``(low, high, rows)`` for equal-width length ranges from the shortest row to the longest."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    counts: dict[int, int] = {}
    for length in lengths:
        start = low + (length - low) // width * width
        counts[start] = counts.get(start, 0) + 1
    return [(start, start + width - 1, counts.get(start, 0)) for start in range(low, high + 1, width)]


def _decoded(ids: list[int], tokenizer: Any) -> str:
    """The text of ``ids``; tokens that decode to nothing (special tokens some tokenizers hide even
    with skip_special_tokens=False, such as ChatGLM-6B's [gMASK] <sop> <eop>) shown by name."""
    text, run = "", []
    for token in [*ids, None]:
        if token is not None and tokenizer.decode([token], skip_special_tokens=False):
            run.append(token)
            continue
        text += tokenizer.decode(run, skip_special_tokens=False) if run else ""
        run = []
        if token is not None:
            name = tokenizer.eos_token if token == tokenizer.eos_token_id else tokenizer.convert_ids_to_tokens(token)
            text += name or f"<id {token}>"
    return text


def masked_text(row: dict[str, list[int]], tokenizer: Any) -> Text:
    """A row's tokens decoded, trained spans (labels != -100) in bold green between ⟦ and ⟧."""
    text = Text()
    ids, labels = row["input_ids"], row["labels"]
    start = 0
    while start < len(ids):
        trained = labels[start] != IGNORE
        end = start
        while end < len(ids) and (labels[end] != IGNORE) == trained:
            end += 1
        piece = _decoded(ids[start:end], tokenizer)
        text.append(f"⟦{piece}⟧" if trained else piece, style="bold green" if trained else "dim")
        start = end
    return text


def _problems(console: Console, title: str, problems: list[str]) -> None:
    if problems:
        console.print(f"[bold]{title}:[/bold] {len(problems)}")
        for problem in problems[:SHOWN_PROBLEMS]:
            console.print(f"  {problem}", markup=False)
        if len(problems) > SHOWN_PROBLEMS:
            console.print(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")


def print_inspection(
    console: Console,
    path: str,
    examples: Examples,
    rows: TokenizedRows,
    tokenizer: Any,
    template_name: str,
    args: DataArgs,
    shown: int = 2,
) -> None:
    stats = rows.stats
    console.print(f"[bold]{path}[/bold]: format [cyan]{examples.format}[/cyan], {len(examples)} rows read")
    _problems(console, "bad rows skipped", examples.skipped)
    console.print(f"template [cyan]{template_name}[/cyan]: {stats.rows} rows tokenized")
    if template_name in ("chatglm", "chatglm2", "characterglm"):
        limits = f"max_source_length {args.max_source_length}, max_target_length {args.max_target_length}"
    else:
        limits = f"max_seq_length {args.sequence_limit}"
    console.print(f"limits ({limits}): {stats.truncated} rows truncated, {len(stats.dropped)} dropped")
    _problems(console, "dropped by the limits", stats.dropped)
    _problems(console, "rows the template cannot lay out", stats.skipped)

    table = Table(title="tokens per row", show_edge=False)
    for column, justify in (("tokens", "right"), ("rows", "right"), ("", "left")):
        table.add_column(column, justify=justify)
    bins = histogram(stats.lengths)
    most = max((count for _, _, count in bins), default=1)
    for low, high, count in bins:
        table.add_row(f"{low}-{high}", str(count), "█" * round(40 * count / most))
    console.print(table)
    if stats.lengths:
        mean = sum(stats.lengths) / len(stats.lengths)
        console.print(f"min {min(stats.lengths)}, mean {mean:.1f}, max {max(stats.lengths)} tokens")
    for index, row in enumerate(rows[:shown]):
        trained = sum(label != IGNORE for label in row["labels"])
        console.print(f"\n[bold]row {index + 1}[/bold]: {len(row['input_ids'])} tokens, {trained} with loss ⟦…⟧")
        console.print(masked_text(row, tokenizer))
