"""Examples -> ``input_ids`` and ``labels`` (-100 where no loss), laid out as each model family was tuned.

- ``chatglm`` (ChatGLM-6B), THUDM/ChatGLM-6B ``ptuning/main.py``: ``prompt [gMASK] <sop> answer <eop>``,
  the prompt cut to ``max_source_length - 1`` ids and the answer to ``max_target_length - 2``; labels
  from ``<sop>`` on.
- ``chatglm2`` and ``characterglm``, THUDM/ChatGLM2-6B ``ptuning/main.py``: ``[gMASK] sop prompt`` cut
  to ``max_source_length`` ids in all, the answer cut to ``max_target_length``, then eos; labels on the
  answer and eos.
- ``chatglm3`` and ``hf`` (a chat template): the whole conversation as chat renders it, loss on every
  assistant reply and the token that ends it (``render_conversation`` of the template), the sequence cut
  to ``max_seq_length``; a row left with no loss token is dropped (and counted).

In the first two the prompt is the template's own ``build_prompt`` of the messages before the reply,
with ``source_prefix`` in front; earlier turns go into it as ``[Round i]`` history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from glmkit.errors import GlmkitError
from glmkit.templates import ChatTemplate, Message, get_template
from glmkit.train.examples import DataArgs, Example

IGNORE = -100  # the label of a position without loss (torch's cross-entropy ignore_index)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]  # what the model is given at evaluation: the ids before the last reply
    truncated: bool = False


@dataclass
class DataStats:
    rows: int = 0  # rows tokenized (kept)
    truncated: int = 0  # kept rows cut by a length limit
    dropped: list[str] = field(default_factory=list)  # "FILE:LINE: why" of rows the limits left without loss
    skipped: list[str] = field(default_factory=list)  # "FILE:LINE: why" of rows that could not be laid out
    lengths: list[int] = field(default_factory=list)  # tokens per kept row


class TokenizedRows(list):
    """``list[dict]`` of ``{"input_ids", "labels"}``, with the :class:`DataStats` of how it was made."""

    def __init__(self, rows: list[dict[str, list[int]]], stats: DataStats) -> None:
        super().__init__(rows)
        self.stats = stats


def as_template(template: str | ChatTemplate) -> ChatTemplate:
    return get_template(template) if isinstance(template, str) else template


def _with_prefix(messages: list[Message], prefix: str) -> list[Message]:
    """``source_prefix`` in front of the first user message (the official scripts prefix the prompt)."""
    if not prefix:
        return messages
    first = next((i for i, message in enumerate(messages) if message["role"] == "user"), None)
    if first is None:
        return messages
    prefixed = {**messages[first], "content": prefix + messages[first]["content"]}
    return [*messages[:first], prefixed, *messages[first + 1 :]]


def _prompt_text(template: Any, example: Example, prefix: str) -> str:
    """The official scripts' prompt: the template's text of the turns before the reply, prefix first."""
    if template.name == "characterglm":
        return prefix + template.build_prompt(example.prompt_messages, example.character)
    if example.character:
        raise GlmkitError("character cards need a CharacterGLM model (template 'characterglm')")
    return prefix + template.build_prompt(example.prompt_messages)


def _chatglm(example: Example, tokenizer: Any, template: Any, args: DataArgs) -> Encoded:
    a_ids = tokenizer.encode(_prompt_text(template, example, args.source_prefix), add_special_tokens=False)
    b_ids = tokenizer.encode(example.response, add_special_tokens=False)
    truncated = len(a_ids) > args.max_source_length - 1 or len(b_ids) > args.max_target_length - 2
    prompt = tokenizer.build_inputs_with_special_tokens(a_ids[: args.max_source_length - 1])  # + [gMASK] <sop>
    input_ids = prompt + b_ids[: args.max_target_length - 2] + [tokenizer.eos_token_id]
    context = len(prompt) - 1  # labels start at <sop>
    return Encoded(input_ids, [IGNORE] * context + input_ids[context:], prompt, truncated)


def _chatglm2(example: Example, tokenizer: Any, template: Any, args: DataArgs) -> Encoded:
    a_ids = tokenizer.encode(_prompt_text(template, example, args.source_prefix), add_special_tokens=False)
    b_ids = tokenizer.encode(example.response, add_special_tokens=False)
    specials = tokenizer.build_inputs_with_special_tokens([])  # [gMASK] sop, counted in max_source_length
    room = args.max_source_length - len(specials)
    truncated = len(a_ids) > room or len(b_ids) > args.max_target_length
    prompt = tokenizer.build_inputs_with_special_tokens(a_ids[:room])
    answer = [*b_ids[: args.max_target_length], tokenizer.eos_token_id]
    return Encoded(prompt + answer, [IGNORE] * len(prompt) + answer, prompt, truncated)


def _conversation(example: Example, tokenizer: Any, template: Any, args: DataArgs) -> Encoded:
    if not hasattr(template, "render_conversation"):
        raise GlmkitError(f"the {template.name} template cannot lay out training conversations")
    messages = _with_prefix(example.messages, args.source_prefix)
    segments = template.render_conversation(tokenizer, messages, example.character)
    input_ids = [token for ids, _ in segments for token in ids]
    labels = [token if trained else IGNORE for ids, trained in segments for token in ids]
    last = max(i for i, (ids, trained) in enumerate(segments) if trained and ids)
    while last and segments[last - 1][1]:  # the last reply and the token that ends it: one trained run
        last -= 1
    prompt = [token for ids, _ in segments[:last] for token in ids]
    limit = args.sequence_limit
    return Encoded(input_ids[:limit], labels[:limit], prompt, len(input_ids) > limit)


LAYOUTS = {"chatglm": _chatglm, "chatglm2": _chatglm2, "characterglm": _chatglm2}


def encode_example(example: Example, tokenizer: Any, template: str | ChatTemplate, args: DataArgs) -> Encoded:
    """One example laid out for ``template``'s family (see the module docstring)."""
    template = as_template(template)
    return LAYOUTS.get(template.name, _conversation)(example, tokenizer, template, args)


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, template: str | ChatTemplate, args: DataArgs
) -> TokenizedRows:
    """``{"input_ids", "labels"}`` per example, unpadded, exactly what training feeds the model.

    A row the template cannot lay out raises GlmkitError naming FILE:LINE (``skip_bad_rows``: skipped and
    listed in ``stats.skipped``); rows cut by the limits are counted in ``stats.truncated``, rows left
    without a loss token listed in ``stats.dropped``.
    """
    template = as_template(template)
    stats = DataStats()
    rows = []
    for example in examples:
        try:
            encoded = encode_example(example, tokenizer, template, args)
        except GlmkitError as exc:
            if not args.skip_bad_rows:
                raise GlmkitError(f"{example.source}: {exc}") from None
            stats.skipped.append(f"{example.source}: {exc}")
            continue
        if all(label == IGNORE for label in encoded.labels):
            stats.dropped.append(f"{example.source}: max_seq_length {args.sequence_limit} cuts before the reply")
            continue
        stats.rows += 1
        stats.truncated += encoded.truncated
        stats.lengths.append(len(encoded.input_ids))
        rows.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    return TokenizedRows(rows, stats)
