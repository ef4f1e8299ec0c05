"""Generation settings: one dataclass shared by the Python API, the CLI and the servers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from glmkit.errors import GlmkitError


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
        checks = [
            (self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.max_length is None or self.max_length >= 1, "max_length must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 <= self.top_p <= 1, "top_p must be between 0 and 1"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise GlmkitError(message)

    @property
    def greedy(self) -> bool:
        """``temperature=0`` or ``top_p=0`` mean greedy, as users of the ChatGLM API expect."""
        return not self.do_sample or self.temperature == 0 or self.top_p == 0

    def updated(self, **changes: object) -> GenerationConfig:
        """A copy with the given fields changed; ``None`` values leave a field as it is."""
        changes = {k: v for k, v in changes.items() if v is not None}
        for key in ("stop", "stop_token_ids"):
            if key in changes:
                changes[key] = tuple(changes[key])  # type: ignore[arg-type]
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
            raise GlmkitError(
                f"max_length {config.max_length} leaves no room after the {prompt_length}-token prompt"
            )
        budget = min(budget, config.max_length - prompt_length)
    if config.max_new_tokens is not None:
        budget = min(budget, config.max_new_tokens)
    return budget
