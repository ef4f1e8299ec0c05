"""``glmkit data convert``: any readable data file to JSON lines; ShareGPT rows to the messages format."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glmkit.errors import GlmkitError
from glmkit.train.examples import DataArgs, example_to_row, load_examples
from glmkit.train.formats import detect_format
from glmkit.train.reading import read_records, write_jsonl


def convert_file(source: str | Path, target: str | Path, args: DataArgs, to_messages: bool = False) -> tuple[str, int]:
    """Write ``source`` as JSON lines to ``target``; return the detected format and the rows written.

    ShareGPT rows (or every format with ``to_messages``) become ``{"messages": [...]}`` rows; other rows
    are written as they are (an alpaca JSON array or a CSV file becomes one JSON object per line).
    """
    if Path(source).resolve() == Path(target).resolve():
        raise GlmkitError("the output file must differ from the input file")
    fmt = args.format or detect_format(_first_row(source), args.prompt_column)
    if to_messages or fmt == "sharegpt":
        examples = load_examples(source, DataArgs(**{**vars(args), "format": fmt}))
        return "messages", write_jsonl(target, (example_to_row(example) for example in examples))
    return fmt, write_jsonl(target, _raw_rows(source, args))


def _first_row(source: str | Path) -> Any:
    for record in read_records(source):
        if record.problem is None:
            return record.value
    raise GlmkitError(f"{source}: no readable rows")


def _raw_rows(source: str | Path, args: DataArgs) -> Iterator[Any]:
    for count, record in enumerate(read_records(source)):
        if args.max_rows is not None and count >= args.max_rows:
            return
        if record.problem is None:
            yield record.value
        elif not args.skip_bad_rows:
            raise GlmkitError(f"{record.source}: {record.problem} (--skip-bad-rows leaves such rows out)")
