"""ChatGLM-6B tokenizer (``ice_text.model``) on plain sentencepiece, plus the parts both ChatGLM
tokenizer generations share (batching, left padding, decoding, save/load).

It reproduces the reference ``THUDM/chatglm-6b`` tokenizer as it ran under transformers 4.30, the last
version it worked with: newlines, tabs and runs of spaces become the ``<n>``, ``<|tab|>`` and
``<|blank_N|>`` pieces; ``[MASK]``, ``<sop>``, ``<eop>``, ``<unk>`` and ``<pad>`` typed as text are split
out as special tokens (with the whitespace around them dropped) while ``[gMASK]`` is not; ``[gMASK]``
and ``<sop>`` are appended after the text; padding is on the left and builds the reference's
``[1, seq, seq]`` attention mask (True = may not attend) and ``[2, seq]`` position ids.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import sentencepiece as spm

from glmkit.errors import GlmkitError

Row = dict[str, Any]


def as_id_list(ids: Any) -> list[int]:
    """Token ids from an int, a sequence, a numpy array or a torch tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


def clean_up_tokenization(text: str) -> str:
    """The space clean-up transformers applied when decoding (" ," -> "," and the like)."""
    for before, after in (
        (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
        (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
    ):  # fmt: skip
        text = text.replace(before, after)
    return text


class ChatGLMTokenizerBase:
    """A vocabulary file with the Hugging Face tokenizer calls glmkit uses (sentencepiece unless a subclass
    reads another format).

    Subclasses say how text becomes pieces, where ``[gMASK]``/``sop`` go, how a row is padded and how
    ids read back; everything else (calling conventions, tensors, saving) is here.
    """

    vocab_file_name: ClassVar[str]
    tokenizer_class: ClassVar[str] = "ChatGLMTokenizer"  # written to tokenizer_config.json
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None

    def __init__(
        self,
        vocab_file: str | Path,
        *,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        # The reference pads on the left only (its position ids and masks assume it).
        if padding_side != "left":
            raise GlmkitError(f"ChatGLM tokenizers pad on the left only, not {padding_side!r}")
        self.vocab_file = Path(vocab_file)
        self._load_vocabulary(self.vocab_file)
        self.padding_side = padding_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        # tokenizer_config.json as read, written back by save_pretrained
        self.init_kwargs = dict(init_kwargs or {})

    def _load_vocabulary(self, vocab_file: Path) -> None:
        """Read the vocabulary file (sentencepiece here; GLM-4's tiktoken ranks override this)."""
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(vocab_file))
        except (OSError, RuntimeError) as exc:
            raise GlmkitError(f"{vocab_file} is not a readable sentencepiece model: {exc}") from exc

    # -- loading and saving ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any):
        """Load from a directory holding the sentencepiece model and (optionally) tokenizer_config.json."""
        directory = Path(directory)
        vocab_file = directory / cls.vocab_file_name
        if not vocab_file.is_file():
            raise GlmkitError(f"{directory} has no {cls.vocab_file_name}")
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise GlmkitError(f"{config_path} is not valid JSON: {exc}") from exc
        return cls.from_config(vocab_file, {**config, **overrides})

    @classmethod
    def from_config(cls, vocab_file: Path, config: dict[str, Any]):
        raise NotImplementedError

    @staticmethod
    def padding_options(config: dict[str, Any]) -> dict[str, Any]:
        """The tokenizer_config.json settings every subclass takes."""
        return {key: config[key] for key in ("padding_side", "clean_up_tokenization_spaces") if key in config}

    def save_pretrained(self, directory: str | Path) -> tuple[str, str]:
        """Copy the sentencepiece model and write tokenizer_config.json; returns both paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab_path = directory / self.vocab_file_name
        if not (vocab_path.exists() and vocab_path.samefile(self.vocab_file)):
            shutil.copyfile(self.vocab_file, vocab_path)
        config = {**self.init_kwargs, "tokenizer_class": self.tokenizer_class, "padding_side": self.padding_side}
        config_path = directory / "tokenizer_config.json"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return str(config_path), str(vocab_path)

    # -- vocabulary --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        """Ids that ``skip_special_tokens=True`` removes when decoding."""
        raise NotImplementedError

    def tokenize(self, text: str, split_special_tokens: bool = False) -> list[str]:
        """Pieces of ``text``; ``split_special_tokens`` keeps special-token names typed in it as text."""
        raise NotImplementedError

    def _token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token)

    def _id_to_token(self, index: int) -> str:
        # Ids past the vocabulary (the model's padded rows) read as nothing instead of failing.
        return self.sp.id_to_piece(index) if 0 <= index < self.sp.get_piece_size() else ""

    def get_command(self, name: str) -> int:
        """Id of a special token by name, such as ``[gMASK]`` or ``<|user|>`` (ChatGLM2/3, GLM-4)."""
        commands = getattr(self, "_commands", {})
        if name not in commands:
            raise KeyError(f"{name!r} is not a special token of this tokenizer (known: {', '.join(commands)})")
        return commands[name]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Any, skip_special_tokens: bool = False) -> str | list[str]:
        if hasattr(ids, "tolist"):  # numpy / torch, scalar or not
            ids = ids.tolist()
        if isinstance(ids, int):
            return self._id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._id_to_token(i) for i in as_id_list(ids) if i not in special]

    # -- encoding ----------------------------------------------------------------------------------

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        ids = [self._token_to_id(token) for token in self.tokenize(text, split_special_tokens)]
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool = False,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """``{"input_ids": ...}`` plus the extra inputs the reference tokenizer returns.

        A str gives one row (unbatched unless ``return_tensors`` is set); a list of str gives a batch.
        ``truncation`` cuts rows to ``max_length`` on the right, after the special tokens are added.
        """
        single = isinstance(text, str)
        rows = []
        for item in [text] if single else text:
            ids = self.encode(item, add_special_tokens=add_special_tokens)
            if truncation and max_length is not None:
                ids = ids[:max_length]
            rows.append({"input_ids": ids})
        batch = self.pad(rows, padding=padding, max_length=max_length, return_tensors=return_tensors)
        if single and return_tensors is None:
            return {key: value[0] for key, value in batch.items()}
        return batch

    def pad(
        self,
        encoded_inputs: Sequence[Row] | Mapping[str, Sequence[Any]],
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """Left-pad encoded rows (a list of dicts or a dict of lists), as the reference ``_pad``.

        ``padding``: False (no padding, but the extra inputs are still built where the reference
        builds them), True/"longest", or "max_length". Keys other than the model inputs pass through.
        """
        if isinstance(encoded_inputs, Mapping):
            keys = list(encoded_inputs)
            rows = [dict(zip(keys, values, strict=True)) for values in zip(*encoded_inputs.values(), strict=True)]
        else:
            rows = [dict(row) for row in encoded_inputs]
        target: int | None = None
        if padding in (True, "longest"):
            target = max((len(row["input_ids"]) for row in rows), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise GlmkitError('padding="max_length" needs max_length')
            target = max_length
        elif padding not in (False, "do_not_pad"):
            raise GlmkitError(f"unknown padding {padding!r}: use True, 'longest', 'max_length' or False")
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        rows = [self._pad_row(row, target) for row in rows]
        batch = {key: [row[key] for row in rows] for key in rows[0]} if rows else {"input_ids": []}
        return _as_tensors(batch, return_tensors)

    def _pad_row(self, row: Row, target: int | None) -> Row:
        """One row padded on the left to ``target`` tokens (None: no padding)."""
        raise NotImplementedError

    # -- decoding ----------------------------------------------------------------------------------

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._decode_tokens(self.convert_ids_to_tokens(ids, skip_special_tokens))

    def _decode_tokens(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces(tokens)

    def decode(
        self,
        ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of ``ids``. Incomplete UTF-8 (byte-fallback pieces cut by a window) reads as U+FFFD."""
        text = self._decode_ids(as_id_list(ids), skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences: Iterable[Any], **kwargs: Any) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]


def _as_tensors(batch: dict[str, list[Any]], return_tensors: str | None) -> dict[str, Any]:
    if return_tensors is None:
        return batch
    if return_tensors not in ("pt", "np"):
        raise GlmkitError(f"return_tensors must be 'pt', 'np' or None, not {return_tensors!r}")
    if len({len(ids) for ids in batch["input_ids"]}) > 1:
        raise GlmkitError("rows have different lengths: pass padding=True to get tensors")
    arrays = {key: np.asarray(value) for key, value in batch.items()}
    if return_tensors == "np":
        return arrays
    import torch  # only callers that ask for torch tensors pay for the import

    return {key: torch.from_numpy(value) for key, value in arrays.items()}


class ChatGLMTokenizer(ChatGLMTokenizerBase):
    """ChatGLM-6B (v1) tokenizer."""

    vocab_file_name = "ice_text.model"
    max_blank_length = 80

    def __init__(
        self,
        vocab_file: str | Path,
        *,
        bos_token: str = "<sop>",
        eos_token: str = "<eop>",
        mask_token: str = "[MASK]",
        gmask_token: str = "[gMASK]",
        pad_token: str = "<pad>",
        unk_token: str = "<unk>",
        remove_space: bool = False,
        do_lower_case: bool = False,
        padding_side: str = "left",
        # transformers 4.30 cleaned up decoded spaces by default and the reference did not opt out
        clean_up_tokenization_spaces: bool = True,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            vocab_file,
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            init_kwargs=init_kwargs,
        )
        self.remove_space = remove_space
        self.do_lower_case = do_lower_case
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.mask_token, self.gmask_token = mask_token, gmask_token
        self.bos_token_id = self._token_to_id(bos_token)
        self.eos_token_id = self._token_to_id(eos_token)
        self.pad_token_id = self._token_to_id(pad_token)
        self.unk_token_id = self._token_to_id(unk_token)
        self.mask_token_id = self._token_to_id(mask_token)
        self.gmask_token_id = self._token_to_id(gmask_token)
        # transformers kept its "special tokens" whole when they were typed as text; [gMASK] was not
        # one of them (not a standard special-token attribute), so it is tokenized as text.
        self._no_split = (bos_token, eos_token, unk_token, pad_token, mask_token)
        self._no_split_re = re.compile("(" + "|".join(map(re.escape, self._no_split)) + ")")

    @classmethod
    def from_config(cls, vocab_file: Path, config: dict[str, Any]) -> ChatGLMTokenizer:
        if config.get("num_image_tokens", 0):
            raise GlmkitError(
                "this ChatGLM-6B tokenizer reserves image token ids (a revision before the 2023 'slim' "
                "vocabulary); use the final THUDM/chatglm-6b tokenizer files"
            )
        names = ("bos_token", "eos_token", "mask_token", "gmask_token", "pad_token", "unk_token")
        flags = ("remove_space", "do_lower_case", "padding_side", "clean_up_tokenization_spaces")
        kwargs = {key: config[key] for key in names + flags if key in config}
        return cls(vocab_file, **kwargs, init_kwargs=config)

    @property
    def all_special_ids(self) -> list[int]:
        return [self._token_to_id(token) for token in self._no_split]

    def tokenize(self, text: str, split_special_tokens: bool = False) -> list[str]:
        if split_special_tokens:
            return self._tokenize_text(text)
        parts = self._no_split_re.split(text)
        # Odd parts are special tokens; the text on either side of one loses its adjacent whitespace.
        for i in range(1, len(parts), 2):
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
        tokens: list[str] = []
        for i, part in enumerate(parts):
            if i % 2:
                tokens.append(part)
            elif part:
                tokens.extend(self._tokenize_text(part))
        return tokens

    def _tokenize_text(self, text: str) -> list[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        # sentencepiece drops repeated whitespace, so line breaks, tabs and runs of spaces are first
        # turned into the pieces the vocabulary has for them (longest run of spaces first).
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for length in range(self.max_blank_length, 1, -1):
            text = text.replace(" " * length, f"<|blank_{length}|>")
        return self.sp.encode(text, out_type=str)

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        return [*ids, self.gmask_token_id, self.bos_token_id]

    def _decode_tokens(self, tokens: list[str]) -> str:
        text = self.sp.decode_pieces(tokens).replace("<n>", "\n").replace("<|tab|>", "\t")
        for length in range(2, self.max_blank_length + 1):
            text = text.replace(f"<|blank_{length}|>", " " * length)
        return text

    def _pad_row(self, row: Row, target: int | None) -> Row:
        if target is None:
            return row  # the reference adds nothing to an unpadded row
        ids = row["input_ids"]
        seq = len(ids)
        # Everything before <sop> is bidirectional context; from <sop> on, causal.
        context = ids.index(self.bos_token_id) if self.bos_token_id in ids else seq
        if "attention_mask" not in row:
            may_attend = np.tril(np.ones((seq, seq), dtype=bool))
            may_attend[:, :context] = True
            row["attention_mask"] = ~may_attend[None]
        if "position_ids" not in row:
            positions = np.arange(seq, dtype=np.int64)
            mask_id = self.mask_token_id if self.mask_token_id in ids else self.gmask_token_id
            if mask_id in ids:
                positions[context:] = ids.index(mask_id)
            block_positions = np.concatenate(
                [np.zeros(context, dtype=np.int64), np.arange(1, seq - context + 1, dtype=np.int64)]
            )
            row["position_ids"] = np.stack([positions, block_positions])
        missing = target - seq
        if missing > 0:
            row["input_ids"] = [self.pad_token_id] * missing + ids
            row["attention_mask"] = np.pad(
                row["attention_mask"], ((0, 0), (missing, 0), (missing, 0)), constant_values=True
            )
            row["position_ids"] = np.pad(row["position_ids"], ((0, 0), (missing, 0)))
        return row
