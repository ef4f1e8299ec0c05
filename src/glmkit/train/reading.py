"""Data files: rows read with the line each one starts on (a JSON array, JSON lines, or CSV), and
rows written as JSON lines.

JSON files are told apart by their content, not their name (ADGEN's ``train.json`` is JSON lines):
one that starts with ``[`` is an array, anything else is one JSON object per line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmkit.errors import GlmkitError


@dataclass
class Record:
    """One row as read: its value (None when it could not be read) or why it could not be read."""

    source: str  # FILE:LINE
    value: Any = None
    problem: str | None = None


def read_records(path: str | Path) -> Iterator[Record]:
    """The rows of ``path`` in order.  A line that is not valid JSON comes back with ``problem`` set;
    a file that cannot be read at all raises GlmkitError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise GlmkitError(f"cannot read the data file {path}: {exc}") from exc
    if path.suffix.lower() in (".csv", ".tsv"):
        yield from _csv_records(path, text)
    elif text.lstrip().startswith("["):
        yield from _array_records(path, text)
    else:
        yield from _line_records(path, text)


def _line_records(path: Path, text: str) -> Iterator[Record]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield Record(f"{path}:{number}", json.loads(line))
        except json.JSONDecodeError as exc:
            yield Record(f"{path}:{number}", problem=f"invalid JSON: {exc.msg} at column {exc.colno}")


def _array_records(path: Path, text: str) -> Iterator[Record]:
    """The elements of a JSON array, each with the line it starts on (``json.load`` forgets lines)."""
    decoder = json.JSONDecoder()
    position, line = _skip_space(text, text.index("[") + 1), 1
    counted = 0  # ``line`` is the line at offset ``counted``
    while position < len(text) and text[position] != "]":
        line, counted = line + text.count("\n", counted, position), position
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            # past a syntax error the rest of an array cannot be read reliably, so even skip_bad_rows stops
            raise GlmkitError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}; fix the file") from exc
        yield Record(f"{path}:{line}", value)
        position = _skip_space(text, position)
        if position < len(text) and text[position] == ",":
            position = _skip_space(text, position + 1)
        elif position < len(text) and text[position] != "]":
            found = line + text.count("\n", counted, position)
            raise GlmkitError(f"{path}:{found}: invalid JSON: expected ',' or ']' between rows; fix the file")
    if position >= len(text):
        raise GlmkitError(f"{path}: invalid JSON: the array is not closed with ']'")


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _csv_records(path: Path, text: str) -> Iterator[Record]:
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    start = 2  # line 1 is the header
    for row in reader:
        if None in row:  # more cells than the header has names
            yield Record(f"{path}:{start}", problem=f"{len(row[None])} more cells than the header has columns")
        else:
            yield Record(f"{path}:{start}", {key: value for key, value in row.items() if value is not None})
        start = reader.line_num + 1


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Write one JSON value per line (UTF-8, non-ASCII kept readable); return how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
