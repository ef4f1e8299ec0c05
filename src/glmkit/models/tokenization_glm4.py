"""GLM-4 tokenizer (``tokenizer.model`` as a tiktoken rank file) on the ``tiktoken`` package.

The rank file holds one token a line (base64 bytes, space, rank, ranks 0..N-1); the official split
pattern cuts text into pieces before byte-pair merging, and the 14 special tokens take the ids right
after the ranks (``<|endoftext|>`` = 151329 for glm-4-9b-chat). Text is always encoded as text: a
special-token string typed by a user (``<|user|>``) stays plain text, and special tokens are reachable
only by name (``convert_tokens_to_ids``, ``get_command``). ``[gMASK]<sop>`` go in front of the text;
padding is on the left with ``attention_mask``/``position_ids`` as for ChatGLM2/3.

Decoding joins the tokens' bytes and reads them as UTF-8 with replacement, so a character cut by a
window reads as U+FFFD, which is what the streaming detokenizer waits out.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Any

import tiktoken

from glmkit.errors import GlmkitError
from glmkit.models.tokenization_chatglm import ChatGLMTokenizerBase, Row
from glmkit.models.tokenization_chatglm2 import pad_row_left

SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n?")


def is_tiktoken_ranks(path: Path) -> bool:
    """Does ``path`` start like a tiktoken rank file (``base64 rank`` lines), not a sentencepiece model?"""
    try:
        with path.open("rb") as file:
            first = file.readline(1024)
    except OSError:
        return False
    return _RANK_LINE.fullmatch(first) is not None


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        with path.open("rb") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except (ValueError, binascii.Error):
                    raise GlmkitError(f"{path}:{number} is not a rank line (base64 bytes, space, rank)") from None
    except OSError as exc:
        raise GlmkitError(f"cannot read {path}: {exc}") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise GlmkitError(f"{path}: the ranks must be 0..{len(ranks) - 1}, each once")
    return ranks


class GLM4Tokenizer(ChatGLMTokenizerBase):
    vocab_file_name = "tokenizer.model"
    tokenizer_class = "ChatGLM4Tokenizer"

    def __init__(self, vocab_file: str | Path, **options: Any) -> None:
        """``options``: ``padding_side``, ``clean_up_tokenization_spaces``, ``init_kwargs`` (see the base)."""
        super().__init__(vocab_file, **options)
        self.eos_token = self.pad_token = "<|endoftext|>"
        self.eos_token_id = self.pad_token_id = self.special_tokens["<|endoftext|>"]
        self.bos_token_id = self.unk_token_id = None

    def _load_vocabulary(self, vocab_file: Path) -> None:
        ranks = read_ranks(vocab_file)
        self.special_tokens = self._commands = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._special_names = {index: name for name, index in self.special_tokens.items()}
        self.encoding = tiktoken.Encoding(
            name=vocab_file.stem, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )

    @classmethod
    def from_config(cls, vocab_file: Path, config: dict[str, Any]) -> GLM4Tokenizer:
        return cls(vocab_file, **cls.padding_options(config), init_kwargs=config)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._special_names)  # the official tokenizer registers all 14 as special

    def tokenize(self, text: str, split_special_tokens: bool = False) -> list[str]:
        return [self._id_to_token(index) for index in self.encoding.encode_ordinary(text)]

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        ids = self.encoding.encode_ordinary(text)
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def _token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.encoding.encode_single_token(token.encode("utf-8"))
        except KeyError:
            raise KeyError(f"{token!r} is not a token of this vocabulary") from None

    def _id_to_token(self, index: int) -> str:
        if index in self._special_names:
            return self._special_names[index]
        if 0 <= index < self.vocab_size:
            return self.encoding.decode_single_token_bytes(index).decode("utf-8", errors="replace")
        return ""  # the model's padded rows past the vocabulary

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        skipped = self._special_names if skip_special_tokens else {}
        known = [i for i in ids if 0 <= i < self.vocab_size and i not in skipped]
        return self.encoding.decode_bytes(known).decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        return [self.special_tokens["[gMASK]"], self.special_tokens["<sop>"], *ids]

    def _pad_row(self, row: Row, target: int | None) -> Row:
        return pad_row_left(row, target, self.pad_token_id)
