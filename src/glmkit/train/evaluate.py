"""``glmkit eval``: generate a reply for every row through the batch scheduler, score it, write the files.

The scheduler decodes all admitted requests as one batch on models with ``decode_rows`` (the native
Llama and ChatGLM2/3 models) and in turn on others; either way this module runs no decode loop itself.
Outputs, as the official ``ptuning/main.py`` writes them: ``generated_predictions.jsonl`` with
``{"labels", "predict"}`` per row and ``metrics.json`` with the ROUGE/BLEU means.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmkit.engine import Chunk, GenerationConfig
from glmkit.engine.scheduler import Scheduler
from glmkit.errors import GlmkitError
from glmkit.train.examples import DataArgs, Example
from glmkit.train.layouts import encode_example
from glmkit.train.metrics import compute_metrics
from glmkit.train.reading import write_jsonl

PREDICTIONS_FILE = "generated_predictions.jsonl"
METRICS_FILE = "metrics.json"


@dataclass
class Reply:
    text: str = ""
    tokens: int = 0


def generate_all(
    chat_model: Any,
    prompts: Sequence[list[int]],
    config: GenerationConfig,
    batch_size: int,
    progress: bool,
    names: Sequence[str],
) -> list[Reply]:
    """The reply to every prompt, ``batch_size`` requests decoding together in the scheduler; a user
    mistake in one (a prompt longer than the context) raises GlmkitError with that prompt's name."""
    from rich.console import Console
    from rich.progress import Progress

    replies = [Reply() for _ in prompts]
    finished: queue.Queue[tuple[int, BaseException | None]] = queue.Queue()  # one entry per request

    def deliver(i: int, item: Chunk | BaseException | None) -> None:  # runs on the scheduler's thread
        if isinstance(item, Chunk):
            replies[i].text += item.text
            if item.finish_reason:
                replies[i].tokens = item.completion_tokens
                finished.put((i, None))
        else:  # an error, or the end of a stream that had no last chunk
            finished.put((i, item))

    # rows no longer than these requests need: the cache is sized once, for the longest
    sized = {"max_sequence_length": max(map(len, prompts)) + config.max_new_tokens} if config.max_new_tokens else {}
    scheduler = Scheduler(chat_model.engine, max_active=batch_size, max_queue=len(prompts), **sized)
    try:
        for i, prompt in enumerate(prompts):
            scheduler.submit(prompt, config, lambda item, i=i: deliver(i, item))
        with Progress(console=Console(stderr=True), disable=not progress, transient=True) as bar:
            task = bar.add_task("generating", total=len(prompts))
            for _ in prompts:
                i, error = finished.get()
                if isinstance(error, GlmkitError):
                    raise GlmkitError(f"{names[i]}: {error}") from None
                if error is not None:
                    raise error
                bar.advance(task)
    finally:
        scheduler.close()
    return replies


def _as_text(response: Any) -> str:
    """A reply as the metrics read it: ChatGLM3 tool calls (dicts) as JSON."""
    return response.strip() if isinstance(response, str) else json.dumps(response, ensure_ascii=False)


def evaluate(
    chat_model: Any,
    examples: Sequence[Example],
    data_args: DataArgs,
    generation_config: GenerationConfig,
    output_dir: str | Path,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the last reply of every example, score it against the reference, write the two files.

    The prompt of a row is the prompt part of its training layout (``encode_example(...).prompt_ids``:
    ``source_prefix`` and the length limits as in training), so a tuned model is asked as it was taught.
    A row the template cannot lay out raises GlmkitError, or with ``skip_bad_rows`` is counted in
    ``skipped_rows``.  Returns what ``metrics.json`` holds: the four metrics, ``rows`` (scored),
    ``skipped_rows``, ``generated_tokens``, ``generation_seconds`` and ``tokens_per_second``.
    """
    if batch_size < 1:
        raise GlmkitError("batch_size must be at least 1")
    prompts, kept, skipped = [], [], 0
    for example in examples:
        try:
            prompts.append(encode_example(example, chat_model.tokenizer, chat_model.template, data_args).prompt_ids)
            kept.append(example)
        except GlmkitError as exc:
            if not data_args.skip_bad_rows:
                raise GlmkitError(f"{example.source}: {exc}") from None
            skipped += 1
    if not kept:
        raise GlmkitError(f"no row can be laid out for the {chat_model.template.name} template")
    examples = kept
    started = time.perf_counter()
    sources = [example.source for example in examples]
    replies = generate_all(chat_model, prompts, generation_config, batch_size, progress, sources)
    seconds = time.perf_counter() - started
    predictions = [
        _as_text(chat_model.template.postprocess(reply.text, example.prompt_messages)[0])
        for reply, example in zip(replies, examples, strict=True)
    ]
    labels = [example.response.strip() for example in examples]

    output = Path(output_dir)
    rows = [{"labels": label, "predict": prediction} for label, prediction in zip(labels, predictions, strict=True)]
    write_jsonl(output / PREDICTIONS_FILE, rows)
    tokens = sum(reply.tokens for reply in replies)
    metrics = {
        **compute_metrics(predictions, labels),
        "rows": len(examples),
        "skipped_rows": skipped,
        "generated_tokens": tokens,
        "generation_seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else 0.0,
    }
    (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
