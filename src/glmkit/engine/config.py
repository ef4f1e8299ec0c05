"""Generation settings: one dataclass shared by the Python API, the CLI and the servers.

Every value is checked here, once, so that each interface refuses the same mistakes with the same
message, and nothing a user typed can reach the sampler or the scheduler's worker unchecked.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from glmkit.errors import GlmkitError

#: below this temperature a reply is decoded greedily: dividing logits by a smaller number overflows
#: float32 (1e-300 gives inf, then NaN probabilities), and the distribution is one-hot well before it
MIN_SAMPLING_TEMPERATURE = 1e-5
#: seeds are what ``torch.Generator.manual_seed`` takes: an unsigned 64-bit integer
MAX_SEED = 2**64 - 1
#: a request may name this many stop strings (OpenAI allows 4), each at most this many characters:
#: every generated token is checked against all of them, so an unbounded list slows everyone
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int | None = 512
    #: prompt + reply, the ChatGLM ``max_length`` convention; the tighter of the two limits wins
    max_length: int | None = None
    do_sample: bool = True
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise GlmkitError(f"{name} must be a whole number of at least 1, not {value!r}")
        if not isinstance(self.do_sample, bool):
            raise GlmkitError(f"do_sample must be true or false, not {self.do_sample!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise GlmkitError(f"{name} must be a finite number, not {value!r}")
        if not _is_int(self.top_k):
            raise GlmkitError(f"top_k must be a whole number, not {self.top_k!r}")
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 <= self.top_p <= 1, "top_p must be between 0 and 1"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise GlmkitError(message)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise GlmkitError(f"seed must be a whole number from 0 to 2**64 - 1 ({MAX_SEED}), not {self.seed!r}")
        self._check_stops()

    def _check_stops(self) -> None:
        if not all(isinstance(s, str) and s for s in self.stop):
            raise GlmkitError("stop strings must be non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise GlmkitError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, not {len(self.stop)}")
        if any(len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise GlmkitError(f"a stop string may have at most {MAX_STOP_LENGTH} characters")
        if not all(_is_int(i) and i >= 0 for i in self.stop_token_ids):
            raise GlmkitError("stop_token_ids must be non-negative whole numbers")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise GlmkitError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed")

    @property
    def greedy(self) -> bool:
        """``temperature=0`` or ``top_p=0`` mean greedy, as users of the ChatGLM API expect; so does a
        temperature too small to sample with (``MIN_SAMPLING_TEMPERATURE``)."""
        return not self.do_sample or self.temperature < MIN_SAMPLING_TEMPERATURE or self.top_p == 0

    def updated(self, **changes: object) -> GenerationConfig:
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise GlmkitError(f"unknown generation setting{'s' * (len(unknown) > 1)}: {', '.join(unknown)}")
        for key in ("stop", "stop_token_ids"):
            if key in changes:
                value = changes[key]
                # a single string is one stop string, as over HTTP, not a sequence of characters
                if isinstance(value, str | int):
                    changes[key] = (value,)
                elif isinstance(value, list | tuple | set | frozenset):
                    changes[key] = tuple(value)
                else:
                    raise GlmkitError(f"{key} must be a string or a list of them, not {type(value).__name__}")
        return dataclasses.replace(self, **changes)


def token_budget(prompt_length: int, config: GenerationConfig, context_length: int) -> int:
    """How many tokens may be generated after a prompt of ``prompt_length`` tokens."""
    if prompt_length >= context_length:
        raise GlmkitError(
            f"the prompt has {prompt_length} tokens but the model's context window is {context_length}: "
            "shorten the prompt or the history"
        )
    budget = context_length - prompt_length
    if config.max_length is not None:
        if config.max_length <= prompt_length:
            raise GlmkitError(f"max_length {config.max_length} leaves no room after the {prompt_length}-token prompt")
        budget = min(budget, config.max_length - prompt_length)
    if config.max_new_tokens is not None:
        budget = min(budget, config.max_new_tokens)
    return budget
