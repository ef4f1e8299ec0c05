"""CharacterGLM-6B prompt: a role-play script in plain text, after ``[gMASK] sop``.

As the model's own ``characterglm_generation_utils.py`` builds it (thu-coai/CharacterGLM-6B)::

    以下是一段{bot_name}和{user_name}之间的对话。
    关于{bot_name}的信息：{bot_info}          (only when bot_info is set)
    关于{user_name}的信息：{user_info}        (only when user_info is set)
    [{name}]{one turn, stripped}             (one line per turn; newlines inside become spaces)
    [{bot_name}]

The character card also may hold a ``greeting``: the bot's opening line, shown as its first turn.
The model ends a turn with a line break, so the newline piece stops generation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from glmkit.errors import GlmkitError
from glmkit.templates.base import Message
from glmkit.templates.chatglm2 import strip_reply

CARD_FIELDS = ("bot_name", "user_name", "bot_info", "user_info", "greeting")
REQUIRED_FIELDS = ("bot_name", "user_name")


def read_card(path: str | Path) -> dict[str, str]:
    """A character card from a JSON file: an object with string fields, at least bot_name and user_name."""
    try:
        card = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GlmkitError(f"cannot read the character card {path}: {exc}") from exc
    return check_card(card, str(path))


def check_card(card: Any, where: str) -> dict[str, str]:
    """The card's fields (missing ones empty); GlmkitError naming ``where`` when it is no card."""
    if not isinstance(card, dict) or any(not isinstance(card.get(k), str) or not card[k] for k in REQUIRED_FIELDS):
        raise GlmkitError(f"{where}: a character card is a JSON object with at least {' and '.join(REQUIRED_FIELDS)}")
    return {field: str(card.get(field) or "") for field in CARD_FIELDS}


class CharacterGLMTemplate:
    name = "characterglm"
    skip_special_tokens = False
    #: what the official chat() samples with (characterglm_generation_utils.py); the checkpoint's
    #: generation_config.json names none of them, and its own values still win where it does
    generation_defaults: ClassVar[dict[str, Any]] = {
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 100,
        "repetition_penalty": 1.3,
    }

    def build_prompt(self, messages: list[Message], character: dict[str, str] | None) -> str:
        if not character or not character.get("bot_name") or not character.get("user_name"):
            raise GlmkitError("CharacterGLM needs a character card with at least bot_name and user_name")
        bot, user = character["bot_name"], character["user_name"]
        turns = [(message["role"], message["content"]) for message in messages]
        if any(role not in ("user", "assistant") for role, _ in turns):
            raise GlmkitError("CharacterGLM takes user and assistant messages only; describe roles in the card")
        if not turns or turns[-1][0] != "user":
            raise GlmkitError("CharacterGLM needs messages that end with a user message")
        if len(turns) > 1 and turns[0] == ("user", "") and turns[1][0] == "assistant":
            turns.pop(0)  # history as the official demos keep it: ("", greeting) first
        if character.get("greeting") and turns[0][0] != "assistant":
            turns.insert(0, ("assistant", character["greeting"]))
        lines = [f"以下是一段{bot}和{user}之间的对话。"]
        if character.get("bot_info"):
            lines.append(f"关于{bot}的信息：{character['bot_info']}")
        if character.get("user_info"):
            lines.append(f"关于{user}的信息：{character['user_info']}")
        lines += [f"[{user if role == 'user' else bot}]{content.strip()}" for role, content in turns]
        # One line per entry: the model reads a line break as the end of a turn.
        return "\n".join([line.replace("\n", " ") for line in lines] + [f"[{bot}]"])

    def build_input_ids(
        self, tokenizer: Any, messages: list[Message], character: dict[str, str] | None = None
    ) -> list[int]:
        return tokenizer.encode(self.build_prompt(messages, character))

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        # The reference chat() generates with eos_token_id 13, the byte piece of "\n".
        return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<0x0A>")]

    def postprocess(self, text: str, messages: list[Message]) -> tuple[str, list[Message]]:
        response = strip_reply(text)
        return response, [{"role": "assistant", "content": response}]


TEMPLATE = CharacterGLMTemplate()
