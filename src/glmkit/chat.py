"""ChatModel: a loaded model with its template, history handling and ``chat`` / ``stream_chat``."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from glmkit.demo_model import DEMO_MODEL_NAME
from glmkit.devices import resolve_device, resolve_dtype
from glmkit.engine import Chunk, DecodeSession, Engine, GenerationConfig
from glmkit.engine.step import decode_mode
from glmkit.errors import GlmkitError
from glmkit.hub import resolve_model
from glmkit.models import load_model, load_tokenizer, read_config
from glmkit.models.quantize import DEFAULT_GROUP_SIZE, QuantizationSpec
from glmkit.progress import reporter
from glmkit.templates import ChatTemplate, Message, detect_template, get_template

History = Sequence[Any]  # [(query, response), ...] or [{"role", "content"}, ...]
ROLES = ("system", "user", "assistant", "observation")
# fields of a checkpoint's generation_config.json that become glmkit's defaults
_GENERATION_FIELDS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")


def check_text(text: object, what: str) -> str:
    """``text`` if it is a string that can be encoded; else the user's mistake, said plainly."""
    if not isinstance(text, str):
        raise GlmkitError(f"{what} must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8, smuggled in through argv
        raise GlmkitError(f"{what} is not valid text: it holds bytes that are not UTF-8") from None
    return text


def history_to_messages(history: History | None) -> list[Message]:
    """Accept both history styles; return OpenAI-style messages."""
    if history is not None and not isinstance(history, list | tuple):
        raise GlmkitError(
            f"history must be a list of (query, response) pairs or messages, not {type(history).__name__}"
        )
    messages: list[Message] = []
    for i, item in enumerate(history or []):
        if isinstance(item, dict):
            if item.get("role") not in ROLES or not isinstance(item.get("content", ""), str | dict):
                raise GlmkitError(f"history[{i}] needs a role out of {ROLES} and a string content")
            messages.append(dict(item))
        elif isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
            messages += [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]
        else:
            raise GlmkitError(f"history[{i}] is neither a (query, response) pair nor a message dict")
    return messages


def _read_generation_config(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json; {} when absent or unreadable (it only holds defaults)."""
    path = model_dir / "generation_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _eos_ids(*sources: dict[str, Any]) -> list[int]:
    """eos ids named by the checkpoint (config.json and generation_config.json), as a list."""
    ids: list[int] = []
    for source in sources:
        value = source.get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    return ids


class ChatModel:
    """``response, history = model.chat(query, history)`` and ``stream_chat`` over one loaded model.

    Calls are serialised by a lock; a conversation that continues the previous one reuses its KV cache.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: ChatTemplate,
        generation_config: GenerationConfig | None = None,
        name: str = "model",
        extra_stop_ids: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.generation_config = generation_config or GenerationConfig()
        self.name = name
        stops = tuple(dict.fromkeys([*template.stop_token_ids(tokenizer), *extra_stop_ids]))
        self.engine = Engine(model, tokenizer, stop_token_ids=stops, skip_special_tokens=template.skip_special_tokens)
        self._session = DecodeSession()
        self._lock = threading.Lock()

    # -- building prompts -------------------------------------------------------------------------
    def build_messages(
        self, query: str, history: History | None = None, system: str | None = None, role: str = "user"
    ) -> list[Message]:
        if role not in ("user", "observation"):
            raise GlmkitError(f"role must be 'user' or 'observation', not {role!r}")
        check_text(query, "the query")
        if system is not None:
            check_text(system, "the system prompt")
        messages = history_to_messages(history)
        for message in messages:
            if isinstance(message["content"], str):
                check_text(message["content"], f"a {message['role']} message")
        if system and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": system})
        return [*messages, {"role": role, "content": query}]

    def encode(self, messages: list[Message], character: dict[str, str] | None = None) -> list[int]:
        return self.template.build_input_ids(self.tokenizer, messages, character=character)

    def generation(self, **overrides: Any) -> GenerationConfig:
        """The model's defaults with the given settings changed (``None`` keeps a default)."""
        return self.generation_config.updated(**overrides)

    # -- low level: messages in, text out ---------------------------------------------------------
    def stream_messages(
        self, messages: list[Message], config: GenerationConfig, character: dict[str, str] | None = None
    ) -> Iterator[Chunk]:
        prompt_ids = self.encode(messages, character)
        with self._lock:
            yield from self.engine.stream(prompt_ids, config, session=self._session)

    # -- the ChatGLM contract ---------------------------------------------------------------------
    def _history_out(self, history: History | None, query: str, messages: list[Message], new: list[Message]) -> list:
        as_messages = bool(history) and isinstance(history[0], dict)
        # the role-token formats keep metadata and tool calls, which (query, response) pairs cannot
        if as_messages or (not history and self.template.name in ("chatglm3", "glm4")):
            return [*messages, *new]
        pairs = [tuple(item) for item in (history or [])]
        reply = "".join(m["content"] if isinstance(m["content"], str) else json.dumps(m["content"]) for m in new)
        return [*pairs, (query, reply)]

    def stream_chat(
        self,
        query: str,
        history: History | None = None,
        *,
        system: str | None = None,
        role: str = "user",
        character: dict[str, str] | None = None,
        **generation: Any,
    ) -> Iterator[tuple[Any, list]]:
        """Yield ``(response_so_far, history_with_this_turn)`` as the reply grows."""
        messages = self.build_messages(query, history, system, role)
        config = self.generation(**generation)
        text = ""
        for chunk in self.stream_messages(messages, config, character):
            if chunk.text:
                text += chunk.text
                response, new = self.template.postprocess(text, messages)
                yield response, self._history_out(history, query, messages, new)
            elif chunk.finish_reason and not text:
                response, new = self.template.postprocess(text, messages)
                yield response, self._history_out(history, query, messages, new)

    def chat(
        self,
        query: str,
        history: History | None = None,
        *,
        system: str | None = None,
        role: str = "user",
        character: dict[str, str] | None = None,
        **generation: Any,
    ) -> tuple[Any, list]:
        """The whole reply to ``query`` after ``history``, and the history with this turn added."""
        messages = self.build_messages(query, history, system, role)
        config = self.generation(**generation)
        prompt_ids = self.encode(messages, character)
        with self._lock:
            result = self.engine.generate(prompt_ids, config, session=self._session)
        response, new = self.template.postprocess(result.text, messages)
        return response, self._history_out(history, query, messages, new)


def load(
    model: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    template: str | None = None,
    source: str = "huggingface",
    revision: str | None = None,
    ptuning_checkpoint: str | Path | None = None,
    num_gpus: int = 1,
    quantize: int | None = None,
    group_size: int | None = None,
    adapter: str | Path | None = None,
) -> ChatModel:
    """Load a chat model: a local directory, a hub id, or (no argument) the bundled demo model.

    ``ptuning_checkpoint`` puts a P-Tuning v2 prefix encoder over a ChatGLM model; ``num_gpus`` splits a
    ChatGLM model's layers over that many CUDA GPUs; ``quantize`` (4 or 8) quantizes the decoder linears
    while loading (INT4 in groups of ``group_size``, default 32).  Quantized checkpoints (``glmkit
    quantize``, the official ChatGLM INT4/INT8 ones) load quantized as they are.  ``adapter`` applies what
    ``glmkit train`` wrote: a LoRA adapter folder (merged into the weights; over quantized weights its layers
    stay beside them, as ``glmkit train --quantize`` trained them) or a P-Tuning v2 checkpoint folder.
    """
    # every setting is checked before anything is downloaded, converted or loaded
    if adapter is not None and ptuning_checkpoint is not None:
        raise GlmkitError("give either an adapter or a P-Tuning checkpoint, not both")
    for path, what in ((adapter, "the adapter"), (ptuning_checkpoint, "the P-Tuning checkpoint")):
        if path is not None and not Path(path).expanduser().is_dir():
            raise GlmkitError(f"{what} {path} is not a directory")
    if quantize is not None:
        QuantizationSpec(quantize, group_size or DEFAULT_GROUP_SIZE)
    forced = get_template(template) if template else None
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_dir = resolve_model(model, source=source, revision=revision)
    config = read_config(model_dir)
    # the cheap parts of the checkpoint first: a broken tokenizer or generation config is told before the weights load
    tokenizer = load_tokenizer(model_dir)
    chosen = forced or get_template(detect_template(model_dir, config))
    saved = _read_generation_config(model_dir)
    try:
        family = getattr(chosen, "generation_defaults", {})
        defaults = GenerationConfig().updated(**(family | {k: saved[k] for k in _GENERATION_FIELDS if k in saved}))
    except GlmkitError as exc:
        raise GlmkitError(f"{model_dir / 'generation_config.json'}: {exc}") from None
    name = str(model) if model is not None else DEMO_MODEL_NAME
    count = torch.get_num_threads()
    threads = f" ({count} CPU thread{'s' * (count != 1)})" if torch_device.type == "cpu" else ""
    reporter().say(f"Loading {name} on {torch_device} as {str(torch_dtype).removeprefix('torch.')}{threads}…")
    network = load_model(
        model_dir,
        dtype=torch_dtype,
        device=torch_device,
        ptuning_checkpoint=ptuning_checkpoint,
        num_gpus=num_gpus,
        quantize=quantize,
        group_size=group_size,
    )
    if adapter is not None:
        from glmkit.models.adapters import apply_adapter

        apply_adapter(network, adapter)
    decode_mode(torch_device)  # its notice (eager off CUDA) now, not in the middle of the first reply
    return ChatModel(
        network,
        tokenizer,
        chosen,
        generation_config=defaults,
        name=name,
        extra_stop_ids=_eos_ids(config, saved),
    )
