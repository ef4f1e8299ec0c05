"""The data settings (:class:`DataArgs`) and reading a data file into normalized :class:`Example` rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmkit.errors import GlmkitError
from glmkit.templates import TEMPLATE_NAMES, Message
from glmkit.templates.characterglm import read_card
from glmkit.train.formats import FORMATS, detect_format, known_columns, normalize
from glmkit.train.reading import read_records


@dataclass
class DataArgs:
    """How to read and cut training / evaluation data.  Each field is one CLI flag and one YAML key.

    The length defaults are those of the official ADGEN P-Tuning recipe (``ptuning/train.sh``:
    ``--max_source_length 64 --max_target_length 64``).
    """

    format: str | None = field(
        default=None, metadata={"help": f"Data format: {', '.join(FORMATS)}; default: detected from the keys."}
    )
    prompt_column: str | None = field(
        default=None, metadata={"help": "Column with the prompt (column format); content, prompt, query, question."}
    )
    response_column: str | None = field(
        default=None, metadata={"help": "Column with the response to learn (column format), e.g. summary."}
    )
    history_column: str | None = field(
        default=None, metadata={"help": "Column with earlier turns, a list of (query, response) pairs (column format)."}
    )
    system_column: str | None = field(
        default=None, metadata={"help": "Column with a system prompt (column format)."}
    )
    character: str | None = field(
        default=None,
        metadata={"help": "CharacterGLM card (JSON: bot_name, user_name, bot_info, user_info) for every row."},
    )
    source_prefix: str = field(default="", metadata={"help": "Text put in front of every prompt."})
    max_source_length: int = field(
        default=64, metadata={"help": "Most prompt tokens (ChatGLM-6B/ChatGLM2/CharacterGLM layouts); cut beyond."}
    )
    max_target_length: int = field(
        default=64, metadata={"help": "Most response tokens (ChatGLM-6B/ChatGLM2/CharacterGLM layouts); cut beyond."}
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "Most tokens of a whole conversation (ChatGLM3 and chat-template layouts); "
            "default: max_source_length + max_target_length + 1."
        },
    )
    template: str | None = field(
        default=None, metadata={"help": f"Prompt template ({', '.join(TEMPLATE_NAMES)}); default: the model's own."}
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Count and report bad rows instead of stopping at the first one."}
    )
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows."})

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise GlmkitError(f"unknown data format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.template is not None and self.template not in TEMPLATE_NAMES:
            raise GlmkitError(f"unknown template {self.template!r}: choose one of {', '.join(TEMPLATE_NAMES)}")
        for name in ("max_source_length", "max_target_length", "max_seq_length", "max_rows"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "max_rows" else 3):
                raise GlmkitError(f"{name} must be at least {1 if name == 'max_rows' else 3}, not {value}")

    @property
    def sequence_limit(self) -> int:
        """The whole-sequence limit; its default is ChatGLM3 finetune_demo's input + output + 1."""
        return self.max_seq_length or self.max_source_length + self.max_target_length + 1


@dataclass
class Example:
    """One training row: chat messages ending with the assistant reply to learn.

    Loss goes on assistant messages only (the layout decides which of them; see ``tokenize_examples``).
    ``source`` is ``FILE:LINE`` for messages that point the user at the row.
    """

    messages: list[Message]
    character: dict[str, str] | None = None
    source: str = ""

    @property
    def prompt_messages(self) -> list[Message]:
        """The conversation before the last reply: what a model is asked when it is evaluated."""
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]


class Examples(list):
    """``list[Example]`` that also says which format was read and which rows were skipped (and why)."""

    def __init__(self, rows: list[Example], format: str, skipped: list[str]) -> None:
        super().__init__(rows)
        self.format = format
        self.skipped = skipped


def load_examples(path: str | Path, args: DataArgs) -> Examples:
    """Read a JSON (array), JSON lines or CSV file into normalized examples.

    The format is ``args.format`` or detected from the first row's keys.  A bad row raises GlmkitError
    naming FILE:LINE; with ``args.skip_bad_rows`` it is left out and listed in ``skipped`` instead.
    """
    card = read_card(args.character) if args.character else None
    columns = {
        "prompt": args.prompt_column,
        "response": args.response_column,
        "history": args.history_column,
        "system": args.system_column,
    }
    fmt = args.format
    rows: list[Example] = []
    skipped: list[str] = []
    for record in read_records(path):
        if args.max_rows is not None and len(rows) >= args.max_rows:
            break
        try:
            if record.problem:
                raise GlmkitError(record.problem)
            fmt = fmt or detect_format(record.value, args.prompt_column)
            if fmt == "columns" and not (columns["prompt"] and columns["response"]):
                columns = known_columns(record.value, columns)  # then fixed for the rest of the file
            messages, row_card = normalize(record.value, fmt, columns)
        except GlmkitError as exc:
            if not args.skip_bad_rows:
                raise GlmkitError(f"{record.source}: {exc} (--skip-bad-rows leaves such rows out)") from None
            skipped.append(f"{record.source}: {exc}")
            continue
        rows.append(Example(messages, row_card or card, record.source))
    if not rows:
        detail = f" ({len(skipped)} bad, the first: {skipped[0]})" if skipped else ""
        raise GlmkitError(f"{path}: no usable rows{detail}")
    return Examples(rows, fmt or "", skipped)


def example_to_row(example: Example) -> dict[str, Any]:
    """An example in the messages format (what ``glmkit data convert --to messages`` writes)."""
    row: dict[str, Any] = {"messages": example.messages}
    if example.character:
        row["character"] = {key: value for key, value in example.character.items() if value}
    return row
