"""ChatGLM2-6B / ChatGLM3-6B / CharacterGLM-6B tokenizer (``tokenizer.model``) on plain sentencepiece.

Text is encoded by sentencepiece alone (special-token text such as ``<|user|>`` stays text); the
special tokens ``[MASK] [gMASK] [sMASK] sop eop`` and, for ChatGLM3, the role tokens ``<|system|>
<|user|> <|assistant|> <|observation|>`` get the ids right after the sentencepiece vocabulary and are
only reachable through :meth:`ChatGLM2Tokenizer.get_command`. ``[gMASK] sop`` is put in front of the
text; padding is on the left with ``attention_mask``/``position_ids`` as the reference returns them.

The ChatGLM2 reference has no role tokens and decodes its special tokens as nothing, while ChatGLM3
writes them out (``"[gMASK]sop 你好"``); ``role_tokens`` picks between the two. Plain-text ids are the
same in both, so the ChatGLM2 prompt template works with either.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from glmkit.models.tokenization_chatglm import ChatGLMTokenizerBase, Row

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

# A ChatGLM2 checkpoint names itself so in tokenizer_config.json; early chatglm2-6b(-int4) revisions
# kept "THUDM/chatglm-6b" there (ChatGLM-6B itself ships ice_text.model, not tokenizer.model).
_CHATGLM2_NAME = re.compile(r"chatglm2|chatglm-6b", re.IGNORECASE)


class ChatGLM2Tokenizer(ChatGLMTokenizerBase):
    vocab_file_name = "tokenizer.model"

    def __init__(
        self,
        vocab_file: str | Path,
        *,
        role_tokens: bool = True,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            vocab_file,
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            init_kwargs=init_kwargs,
        )
        self.role_tokens = role_tokens
        first = self.sp.get_piece_size()
        names = SPECIAL_TOKENS + (ROLE_TOKENS if role_tokens else ())
        self.special_tokens = {name: first + offset for offset, name in enumerate(names)}
        self._special_names = {index: name for name, index in self.special_tokens.items()}
        # get_command's names. The sentencepiece <unk> doubles as padding; <s> is never used (prompts
        # start with [gMASK] sop).
        self._commands = {
            "<bos>": self.sp.bos_id(),
            "<eos>": self.sp.eos_id(),
            "<pad>": self.sp.unk_id(),
            **self.special_tokens,
        }
        self.eos_token, self.pad_token, self.unk_token = "</s>", "<unk>", "<unk>"
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.unk_token_id = self.sp.unk_id()
        self.bos_token_id = None

    @classmethod
    def from_config(cls, vocab_file: Path, config: dict[str, Any]) -> ChatGLM2Tokenizer:
        kwargs = cls.padding_options(config)
        if "role_tokens" in config:
            kwargs["role_tokens"] = bool(config["role_tokens"])
        else:
            kwargs["role_tokens"] = not _CHATGLM2_NAME.search(str(config.get("name_or_path", "")))
        return cls(vocab_file, **kwargs, init_kwargs=config)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self.special_tokens)

    @property
    def all_special_ids(self) -> list[int]:
        # What the reference registered as special (eos "</s>", unk/pad "<unk>"); [gMASK], sop and the
        # role tokens were not, so skip_special_tokens keeps them, as it did there.
        return [self.eos_token_id, self.pad_token_id]

    def tokenize(self, text: str, split_special_tokens: bool = False) -> list[str]:
        # special tokens never come out of text here: sentencepiece has no pieces for them
        return self.sp.encode(text, out_type=str)

    def _token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp.piece_to_id(token)

    def _id_to_token(self, index: int) -> str:
        if index in self._special_names:
            return self._special_names[index] if self.role_tokens else ""
        if index in (self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()):
            return ""
        return super()._id_to_token(index)

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        return [self.special_tokens["[gMASK]"], self.special_tokens["sop"], *ids]

    def _pad_row(self, row: Row, target: int | None) -> Row:
        return pad_row_left(row, target, self.pad_token_id)


def pad_row_left(row: Row, target: int | None, pad_token_id: int) -> Row:
    """A row with the ``attention_mask`` (1 = token) and ``position_ids`` of the ChatGLM2/3 and GLM-4
    references, left-padded to ``target`` tokens (None: no padding)."""
    ids = row["input_ids"]
    row.setdefault("attention_mask", [1] * len(ids))
    row.setdefault("position_ids", list(range(len(ids))))
    missing = 0 if target is None else target - len(ids)
    if missing > 0:
        row["input_ids"] = [pad_token_id] * missing + ids
        row["attention_mask"] = [0] * missing + list(row["attention_mask"])
        row["position_ids"] = [0] * missing + list(row["position_ids"])
    return row
