"""TEMPORARY stand-in for PART A's data module (to be replaced by PART A's ``glmkit.train.data`` at merge).

Only what ``glmkit train`` needs to run end to end in this branch's tests: JSON lines with ``prompt``
and ``response``, the prompt built with the model's chat template and masked with -100.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmkit.errors import GlmkitError


@dataclass
class DataArgs:
    max_source_length: int = field(default=512, metadata={"help": "Most prompt tokens (longer prompts are cut)."})
    max_target_length: int = field(default=512, metadata={"help": "Most response tokens (longer ones are cut)."})


def load_examples(path: str | Path, args: DataArgs) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise GlmkitError(f"data file {path} not found")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def tokenize_examples(examples: list[dict[str, Any]], tokenizer: Any, template: Any, args: DataArgs) -> list[dict]:
    rows = []
    for example in examples:
        prompt = template.build_input_ids(tokenizer, [{"role": "user", "content": example["prompt"]}])
        answer = tokenizer.encode(example["response"], add_special_tokens=False)[: args.max_target_length]
        prompt, answer = prompt[-args.max_source_length :], [*answer, tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows
