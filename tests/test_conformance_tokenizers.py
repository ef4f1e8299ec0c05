"""The ChatGLM tokenizers against the outputs the official THUDM tokenizers recorded (conformance data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import V1_DIR, V3_DIR, load_expected, needs_conformance

from glmkit.engine.detokenizer import StreamingDetokenizer
from glmkit.errors import GlmkitError
from glmkit.models import load_tokenizer
from glmkit.models.tokenization_chatglm import ChatGLMTokenizer
from glmkit.models.tokenization_chatglm2 import ChatGLM2Tokenizer

pytestmark = needs_conformance


V1 = load_expected(V1_DIR)
V3 = load_expected(V3_DIR)
V1_CASES = V1.get("tokenizer", {}).get("cases", [])
V3_CASES = V3.get("tokenizer", {}).get("cases", [])
V2_CASES = V3.get("chatglm2_6b", {}).get("tokenizer_vs_v3", [])
DECODE_KEYS = ("decode_input_ids", "decode_input_ids_skip_special_tokens", "decode_no_special")


def _decodes(tok, case: dict) -> dict[str, str]:
    return {
        "decode_input_ids": tok.decode(case["input_ids"]),
        "decode_input_ids_skip_special_tokens": tok.decode(case["input_ids"], skip_special_tokens=True),
        "decode_no_special": tok.decode(case["input_ids_no_special"]),
    }


# -- ChatGLM-6B ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", V1_CASES, ids=[repr(c["text"][:24]) for c in V1_CASES])
def test_v1_case(v1, case):
    text = case["text"]
    assert v1(text) == {"input_ids": case["input_ids"]}  # no mask/positions unless padding
    assert v1.encode(text) == case["input_ids"]
    assert v1.encode(text, add_special_tokens=False) == case["input_ids_no_special"]
    assert v1.tokenize(text) == case["tokens"]
    assert v1.convert_ids_to_tokens(case["input_ids_no_special"]) == case["tokens"]
    assert _decodes(v1, case) == {key: case[key] for key in DECODE_KEYS}
    assert (v1.decode(case["input_ids_no_special"]) == text) == case["roundtrip_equal"]


def test_v1_special_tokens(v1):
    expected = V1["tokenizer"]
    assert {name: v1.convert_tokens_to_ids(name) for name in expected["special_token_ids"]} == expected[
        "special_token_ids"
    ]
    assert (v1.pad_token_id, v1.bos_token, v1.eos_token) == (
        expected["pad_token_id"],
        expected["bos_token"],
        expected["eos_token"],
    )
    assert (v1.bos_token_id, v1.eos_token_id, v1.gmask_token_id, v1.mask_token_id) == (130004, 130005, 130001, 130000)
    assert len(v1) == v1.vocab_size == expected["vocab_size"]
    assert v1.padding_side == "left"


def test_v1_padded_batch(v1):
    example = V1["tokenizer"]["batch_padding_example"]
    batch = v1(example["texts"], padding=True)
    assert batch["input_ids"] == example["input_ids"]
    assert [mask.tolist() for mask in batch["attention_mask"]] == example["attention_mask"]
    assert [positions.tolist() for positions in batch["position_ids"]] == example["position_ids"]

    tensors = v1(example["texts"], padding=True, return_tensors="pt")
    assert tensors["attention_mask"].tolist() == example["attention_mask"]
    assert tuple(tensors["attention_mask"].shape) == (2, 1, 12, 12)
    assert tuple(tensors["position_ids"].shape) == (2, 2, 12)


def test_v1_pad_accepts_encoded_rows(v1):
    example = V1["tokenizer"]["batch_padding_example"]
    rows = [{"input_ids": v1.encode(text), "labels": [7]} for text in example["texts"]]
    batch = v1.pad(rows, padding="max_length", max_length=14)
    assert batch["input_ids"][0] == [v1.pad_token_id] * 10 + v1.encode(example["texts"][0])
    assert batch["attention_mask"][0].shape == (1, 14, 14)
    assert batch["labels"] == [[7], [7]]  # other keys pass through


# -- ChatGLM3-6B (and ChatGLM2-6B, same tokenizer.model) -------------------------------------------


@pytest.mark.parametrize("case", V3_CASES, ids=[repr(c["text"][:24]) for c in V3_CASES])
def test_v3_case(v3, case):
    text = case["text"]
    assert v3(text) == {key: case[key] for key in ("input_ids", "attention_mask", "position_ids")}
    assert v3.encode(text, add_special_tokens=False) == case["input_ids_no_special"]
    assert v3.tokenize(text) == case["tokens"]
    assert _decodes(v3, case) == {key: case[key] for key in DECODE_KEYS}
    assert (v3.decode(case["input_ids_no_special"]) == text) == case["roundtrip_equal"]


def test_v3_special_tokens(v3):
    expected = V3["tokenizer"]
    assert {name: v3.get_command(name) for name in expected["special_token_ids"]} == expected["special_token_ids"]
    assert (v3.pad_token_id, v3.eos_token_id) == (expected["pad_token_id"], expected["eos_token_id"])
    assert len(v3) == v3.vocab_size == expected["vocab_size"]
    assert v3.convert_tokens_to_ids(["<|user|>", "▁hi"]) == [64795, 14980]
    with pytest.raises(KeyError):
        v3.get_command("<|tool|>")


def test_v3_padded_batch(v3):
    example = V3["tokenizer"]["batch_padding_example"]
    batch = v3(example["texts"], padding=True)
    assert batch == {key: example[key] for key in ("input_ids", "attention_mask", "position_ids")}
    tensors = v3(example["texts"], padding=True, return_tensors="pt")
    assert tensors["input_ids"].tolist() == example["input_ids"]


@pytest.mark.parametrize("case", V2_CASES, ids=[repr(c["text"][:24]) for c in V2_CASES])
def test_v2_case(v2, case):
    assert v2.encode(case["text"]) == case["v2_input_ids"]
    assert v2.decode(case["v2_input_ids"]) == case["v2_decode"]  # ChatGLM2 writes no special tokens


def test_v2_has_no_role_tokens(v2):
    section = V3["chatglm2_6b"]
    assert {name: v2.get_command(name) for name in section["special_token_ids"]} == section["special_token_ids"]
    assert len(v2) == 64794
    with pytest.raises(KeyError):
        v2.get_command("<|user|>")


def test_decoded_space_clean_up(v1, v3):
    # transformers 4.30 cleaned up " ," when decoding; the ChatGLM2/3 reference switched that off
    text = "Hello , world ."
    assert v1.decode(v1.encode(text, add_special_tokens=False)) == "Hello, world."
    assert v1.decode(v1.encode(text, add_special_tokens=False), clean_up_tokenization_spaces=False) == text
    assert v3.decode(v3.encode(text, add_special_tokens=False)) == text


def test_ids_past_the_vocabulary_read_as_nothing(v1, v3):
    # a model's padded embedding rows (65024 > 64798, 130528 > 130344) can be sampled
    assert v3.decode([36474, 64944, 54591]) == "你好"
    assert v1.decode([5, 74874, 130400]) == "你好"


# -- loading, saving, incremental decoding ---------------------------------------------------------


def test_load_tokenizer_dispatch_and_save_roundtrip(tmp_path):
    v1 = load_tokenizer(V1_DIR / "tokenizer")
    v3 = load_tokenizer(V3_DIR / "tokenizer")
    assert isinstance(v1, ChatGLMTokenizer) and isinstance(v3, ChatGLM2Tokenizer) and v3.role_tokens
    text = "你好\n  world\t!"
    for tok, name in ((v1, "v1"), (v3, "v3")):
        saved = tok.save_pretrained(tmp_path / name)
        assert [Path(path).name for path in saved] == ["tokenizer_config.json", tok.vocab_file_name]
        config = json.loads(Path(saved[0]).read_text(encoding="utf-8"))
        assert config["padding_side"] == "left" and config["tokenizer_class"] == "ChatGLMTokenizer"
        again = load_tokenizer(tmp_path / name)
        assert type(again) is type(tok) and again.encode(text) == tok.encode(text)
        assert again.init_kwargs["name_or_path"] == tok.init_kwargs["name_or_path"]


@pytest.mark.parametrize("name", ["v1", "v3"])
@pytest.mark.parametrize("text", ["🎉", "𠀀", "龘"])  # byte-fallback pieces in both vocabularies
def test_partial_characters_decode_as_replacement(request, name, text):
    tok = request.getfixturevalue(name)
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [i for i in ids if tok.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(pieces) >= 3
    for end in range(1, len(pieces)):
        assert tok.decode(pieces[:end]).endswith("\ufffd")
    assert tok.decode(pieces) == text
    assert tok.decode(ids) == text


@pytest.mark.parametrize("name", ["v1", "v3"])
def test_streaming_detokenizer_rebuilds_the_text(request, name):
    tok = request.getfixturevalue(name)
    text = "emoji 😀👍🎉 测试 🇨🇳\n\tdef f(x):\n    return  x  # 𠀀 done"
    ids = tok.encode(text, add_special_tokens=False)
    stream = StreamingDetokenizer(tok, skip_special_tokens=False)
    shown = "".join(stream.push(i) for i in ids) + stream.flush()
    assert "\ufffd" not in shown
    assert shown == tok.decode(ids)


def test_unreadable_model_is_a_user_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(GlmkitError, match="sentencepiece"):
        ChatGLM2Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(GlmkitError, match=r"ice_text\.model"):
        ChatGLMTokenizer.from_pretrained(tmp_path)
