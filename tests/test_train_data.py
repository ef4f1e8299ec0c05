"""Fine-tuning data: formats, bad rows, the per-family layouts with their label masks, the collator.

The ChatGLM-6B and ChatGLM2 layouts are checked against prompt ids the official THUDM tokenizers
recorded (conformance data) and the official ``ptuning/main.py`` rules written out by hand here.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import ADGEN, V1_DIR, V3_DIR, load_expected, needs_conformance, needs_data

from glmkit.errors import GlmkitError
from glmkit.templates import get_template
from glmkit.train.data import DataArgs, DataCollator, Example, load_examples, tokenize_examples
from glmkit.train.layouts import encode_example

V1 = load_expected(V1_DIR)
V3 = load_expected(V3_DIR)
IGNORE = -100


@pytest.fixture(scope="module")
def demo_tokenizer():
    from glmkit.train.data import load_tokenizer_and_template

    return load_tokenizer_and_template(None, DataArgs())


def write_lines(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def chat(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


# -- formats ---------------------------------------------------------------------------------------


@needs_data
def test_adgen_is_detected_as_columns():
    examples = load_examples(ADGEN / "dev.json", DataArgs())
    assert examples.format == "columns"
    assert len(examples) == 100 and not examples.skipped
    first = json.loads((ADGEN / "dev.json").read_text(encoding="utf-8").splitlines()[0])
    assert examples[0].messages == chat(("user", first["content"]), ("assistant", first["summary"]))
    assert examples[0].source == f"{ADGEN / 'dev.json'}:1"
    assert len(load_examples(ADGEN / "dev.json", DataArgs(max_rows=3))) == 3


def test_alpaca_json_array_with_system_history_and_input(tmp_path):
    path = tmp_path / "alpaca.json"
    rows = [
        {"instruction": "Translate", "input": "你好", "output": "Hello"},
        {"instruction": "Go on", "output": "Sure", "system": "Be brief", "history": [["Hi", "Hello!"]]},
    ]
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    examples = load_examples(path, DataArgs())
    assert examples.format == "alpaca"
    assert examples[0].messages == chat(("user", "Translate\n你好"), ("assistant", "Hello"))
    assert examples[1].messages == chat(
        ("system", "Be brief"), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Go on"), ("assistant", "Sure")
    )
    # rows of a pretty-printed array are named by the line they start on
    assert [example.source for example in examples] == [f"{path}:2", f"{path}:7"]


def test_csv_columns_with_history_and_system(tmp_path):
    path = tmp_path / "spam.csv"
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["content", "label", "past", "sys"])
        writer.writerow(["买一送一，点击链接", "spam", "", ""])
        writer.writerow(["明天开会", "ham", json.dumps([["在吗", "在"]], ensure_ascii=False), "分类"])
    args = DataArgs(prompt_column="content", response_column="label", history_column="past", system_column="sys")
    examples = load_examples(path, args)
    assert examples.format == "columns"
    assert examples[0].messages == chat(("user", "买一送一，点击链接"), ("assistant", "spam"))
    assert examples[1].messages == chat(
        ("system", "分类"), ("user", "在吗"), ("assistant", "在"), ("user", "明天开会"), ("assistant", "ham")
    )
    assert examples[1].source == f"{path}:3"


def test_known_column_pairs_need_no_flags(tmp_path):
    path = write_lines(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": "2"}])
    assert load_examples(path, DataArgs())[0].messages == chat(("user", "1+1?"), ("assistant", "2"))


def test_messages_keep_tools_observations_and_metadata(tmp_path):
    tools = [{"name": "weather", "parameters": {"city": "string"}}]
    row = {
        "messages": [
            {"role": "user", "content": "北京天气"},
            {"role": "assistant", "metadata": "weather", "content": "```python\ntool_call(city='北京')\n```"},
            {"role": "tool", "content": {"temperature": 22}},
            {"role": "assistant", "content": "22 度"},
        ],
        "tools": tools,
    }
    examples = load_examples(write_lines(tmp_path / "chat.jsonl", [row]), DataArgs())
    assert examples.format == "messages"
    system, _, call, result, reply = examples[0].messages
    assert system["role"] == "system" and system["tools"] == tools
    assert call == {"role": "assistant", "metadata": "weather", "content": "```python\ntool_call(city='北京')\n```"}
    assert result == {"role": "observation", "content": '{"temperature": 22}'}
    assert reply == {"role": "assistant", "content": "22 度"}


def test_chatglm3_conversations_key_is_the_messages_format(tmp_path):
    row = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    examples = load_examples(write_lines(tmp_path / "c.jsonl", [row]), DataArgs())
    assert examples.format == "messages"
    assert examples[0].messages == chat(("user", "hi"), ("assistant", "hello"))


def test_sharegpt_roles_and_function_calls(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "You help."},
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
        ]
    }
    examples = load_examples(write_lines(tmp_path / "sg.jsonl", [row]), DataArgs())
    assert examples.format == "sharegpt"
    assert examples[0].messages == [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "metadata": "weather", "content": "```python\ntool_call(city='Paris')\n```"},
        {"role": "observation", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]


def test_characterglm_cards_per_row_and_per_file(tmp_path):
    card = {"bot_name": "林澜", "user_name": "游客", "bot_info": "讲解员", "user_info": ""}
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "欢迎！"}]
    examples = load_examples(write_lines(tmp_path / "rp.jsonl", [{**card, "messages": turns}]), DataArgs())
    assert examples.format == "characterglm"
    assert examples[0].character == {**card, "greeting": ""}
    assert examples[0].messages == turns
    nested = write_lines(tmp_path / "nested.jsonl", [{"character": card, "conversations": turns}])
    assert load_examples(nested, DataArgs())[0].character["bot_name"] == "林澜"
    # one card for a whole file of plain chat rows
    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    plain = write_lines(tmp_path / "plain.jsonl", [{"messages": turns}])
    assert load_examples(plain, DataArgs(character=str(card_file)))[0].character["user_name"] == "游客"


# -- bad rows --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"content": "a", "summary": ', "invalid JSON"),
        ('{"content": "a"}', "missing column 'summary'"),
        ('{"content": "a", "summary": 3}', "column 'summary' must be a string"),
        ('{"content": "a", "summary": "  "}', "empty response"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_bad_row_names_file_and_line(tmp_path, line, problem):
    path = tmp_path / "data.jsonl"
    path.write_text('{"content": "x", "summary": "y"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(GlmkitError, match=problem) as raised:
        load_examples(path, DataArgs())
    assert str(raised.value).startswith(f"{path}:3: ")
    examples = load_examples(path, DataArgs(skip_bad_rows=True))
    assert len(examples) == 1
    assert len(examples.skipped) == 1 and examples.skipped[0].startswith(f"{path}:3: ")


def test_broken_json_array_and_unknown_format(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": oops}\n]', encoding="utf-8")
    with pytest.raises(GlmkitError, match=f"{path}:3: invalid JSON"):
        load_examples(path, DataArgs(skip_bad_rows=True))  # an array cannot be read past a syntax error
    odd = write_lines(tmp_path / "odd.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(GlmkitError, match="--prompt-column"):
        load_examples(odd, DataArgs())
    with pytest.raises(GlmkitError, match="unknown data format"):
        DataArgs(format="yaml")


def test_last_turn_must_be_the_reply(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(GlmkitError, match=f"{path}:1: the last turn must be the assistant reply"):
        load_examples(path, DataArgs())


# -- ChatGLM-6B: the official P-Tuning layout ------------------------------------------------------


def v1_case():
    """The recorded official prompt ids of '你好' after history [hi, hello], as a training row."""
    case = V1["chat"][0]
    assert case["query"] == "你好" and case["history"] == [["hi", "hello"]]
    example = Example(chat(("user", "hi"), ("assistant", "hello"), ("user", "你好"), ("assistant", "你好")))
    return case["prompt_input_ids"], example


@needs_conformance
def test_chatglm_layout_matches_official_ptuning(v1):
    official_prompt, example = v1_case()  # text ids + [gMASK] <sop>
    answer = [5, 74874]  # '你好' without special tokens (recorded: tokenizer('你好') = these + 130001, 130004)
    (row,) = tokenize_examples([example], v1, "chatglm", DataArgs())
    assert row["input_ids"] == [*official_prompt, *answer, 130005]
    # labels: -100 on the prompt and [gMASK]; from <sop> on they equal the input ids
    assert row["labels"] == [IGNORE] * (len(official_prompt) - 1) + [130004, *answer, 130005]
    # the prompt part is what chat builds for the same conversation
    assert official_prompt == get_template("chatglm").build_input_ids(v1, example.prompt_messages)


@needs_conformance
def test_chatglm_layout_cuts_prompt_and_answer(v1):
    official_prompt, example = v1_case()
    args = DataArgs(max_source_length=5, max_target_length=3)
    rows = tokenize_examples([example], v1, "chatglm", args)
    # prompt ids cut to max_source_length - 1, answer ids to max_target_length - 2
    assert rows[0]["input_ids"] == [*official_prompt[:4], 130001, 130004, 5, 130005]
    assert rows[0]["labels"] == [IGNORE] * 5 + [130004, 5, 130005]
    assert rows.stats.truncated == 1 and not rows.stats.dropped


@needs_conformance
def test_chatglm_source_prefix_goes_in_front(v1):
    example = Example(chat(("user", "你好"), ("assistant", "你好")))
    (row,) = tokenize_examples([example], v1, "chatglm", DataArgs(source_prefix="hi"))
    prompt = v1.encode("hi你好", add_special_tokens=False)
    assert row["input_ids"] == [*prompt, 130001, 130004, 5, 74874, 130005]


# -- ChatGLM2: its official P-Tuning layout --------------------------------------------------------


def v2_case():
    case = V3["chatglm2_6b"]["chat"][0]
    assert case["query"] == "你好" and case["history"] == [["hi", "hello"]]
    example = Example(chat(("user", "hi"), ("assistant", "hello"), ("user", "你好"), ("assistant", "你好")))
    return case["prompt_input_ids"], example  # [gMASK] sop + '[Round 1]\n\n问：hi…答：'


@needs_conformance
def test_chatglm2_layout_matches_official_ptuning(v3):
    official_prompt, example = v2_case()
    answer = [36474, 54591]  # recorded: tokenizer('你好') = [64790, 64792, 36474, 54591]
    (row,) = tokenize_examples([example], v3, "chatglm2", DataArgs())
    assert row["input_ids"] == [*official_prompt, *answer, 2]
    assert row["labels"] == [IGNORE] * len(official_prompt) + [*answer, 2]
    assert official_prompt == get_template("chatglm2").build_input_ids(v3, example.prompt_messages)


@needs_conformance
def test_chatglm2_layout_cuts_prompt_in_all_and_answer(v3):
    official_prompt, example = v2_case()
    rows = tokenize_examples([example], v3, "chatglm2", DataArgs(max_source_length=10, max_target_length=3))
    # truncation=True, max_length=10 with [gMASK] sop counted; the answer cut to 3 ids (here it has 2)
    assert rows[0]["input_ids"] == [*official_prompt[:10], 36474, 54591, 2]
    assert rows[0]["labels"] == [IGNORE] * 10 + [36474, 54591, 2]
    assert rows.stats.truncated == 1


@needs_conformance
def test_characterglm_layout(v3):
    card = {"bot_name": "林澜", "user_name": "游客", "bot_info": "", "user_info": "", "greeting": ""}
    example = Example(chat(("user", "你好"), ("assistant", "你好")), character=card)
    (row,) = tokenize_examples([example], v3, "characterglm", DataArgs(max_source_length=256))
    prompt = get_template("characterglm").build_input_ids(v3, example.prompt_messages, character=card)
    assert row["input_ids"] == [*prompt, 36474, 54591, 2]
    assert row["labels"] == [IGNORE] * len(prompt) + [36474, 54591, 2]


# -- ChatGLM3: loss on assistant turns only --------------------------------------------------------


def finetune_demo_layout(tokenizer, messages):
    """ChatGLM3 finetune_demo's rule, written out: a mask per message token (assistant: yes), eos
    appended, the mask shifted right by one, labels = ids where the shifted mask is set."""
    from glmkit.templates.chatglm3 import build_single_message

    ids, mask = [64790, 64792], [False, False]
    for message in messages:
        new = build_single_message(tokenizer, message["role"], message.get("metadata", ""), message["content"])
        ids += new
        mask += [message["role"] == "assistant"] * len(new)
    ids.append(tokenizer.eos_token_id)
    shifted = [False, *mask]
    return ids, [token if keep else IGNORE for token, keep in zip(ids, shifted, strict=True)]


@needs_conformance
def test_chatglm3_layout_loss_on_assistant_turns(v3):
    case = V3["chat"][0]  # recorded: build_chat_input('你好', history=[user hi, assistant hello])
    messages = [*case["history"], {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好"}]
    (row,) = tokenize_examples([Example(messages)], v3, "chatglm3", DataArgs())
    official_prompt = case["build_chat_input_ids"]  # ... <|user|> \n 你好 <|assistant|>
    assert row["input_ids"] == [*official_prompt, 30910, 13, 36474, 54591, 2]
    assert (row["input_ids"], row["labels"]) == finetune_demo_layout(v3, messages)
    trained = [token for token in row["labels"] if token != IGNORE]
    # the first reply ('\n' hello) and the <|user|> that ends it, then the last reply and eos
    assert trained == [30910, 13, 24954, 64795, 30910, 13, 36474, 54591, 2]


@needs_conformance
def test_chatglm3_tools_observation_and_limit(v3):
    tools = [{"name": "weather", "parameters": {}}]
    messages = [
        {"role": "system", "content": "Answer", "tools": tools},
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "metadata": "weather", "content": "```python\ntool_call()\n```"},
        {"role": "observation", "content": "晴"},
        {"role": "assistant", "content": "晴天"},
    ]
    template = get_template("chatglm3")
    (row,) = tokenize_examples([Example(messages)], v3, template, DataArgs(max_seq_length=4096))
    ids, labels = row["input_ids"], row["labels"]
    for i, message in enumerate(messages):
        if message["role"] == "assistant":  # the prefix before each reply is what chat sends
            prompt = template.build_input_ids(v3, messages[:i])
            assert ids[: len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE
    system_ids = template.build_input_ids(v3, messages[:2])
    assert all(label == IGNORE for label in labels[: len(system_ids)])
    # the observation is not trained; the <|observation|> token that ends the tool call is
    observation = v3.get_command("<|observation|>")
    at = ids.index(observation)
    assert labels[at] == observation and all(label == IGNORE for label in labels[at + 1 : at + 4])
    rows = tokenize_examples([Example(messages)], v3, template, DataArgs(max_seq_length=20))
    assert len(rows) == 0 and len(rows.stats.dropped) == 1  # cut before any reply: dropped, and counted


@needs_conformance
def test_layout_errors_name_the_row(v3):
    example = Example(chat(("user", "a"), ("observation", "b"), ("assistant", "c")), source="f.jsonl:7")
    with pytest.raises(GlmkitError, match=r"f\.jsonl:7: the chatglm2 template needs alternating"):
        tokenize_examples([example], v3, "chatglm2", DataArgs())
    rows = tokenize_examples([example], v3, "chatglm2", DataArgs(skip_bad_rows=True))
    assert len(rows) == 0 and rows.stats.skipped[0].startswith("f.jsonl:7: ")


# -- chat-template models (the demo model) ---------------------------------------------------------


def test_hf_layout_prompts_are_what_chat_builds(demo_tokenizer):
    tokenizer, template = demo_tokenizer
    messages = chat(
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Capital of France?"),
        ("assistant", "Paris."),
    )  # fmt: skip
    (row,) = tokenize_examples([Example(messages)], tokenizer, template, DataArgs(max_seq_length=512))
    ids, labels = row["input_ids"], row["labels"]
    for i in (2, 4):
        prompt = template.build_input_ids(tokenizer, messages[:i])
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt) - 1] == IGNORE and labels[len(prompt)] != IGNORE  # the reply starts the loss
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    spans += [current] if current else []
    # each reply is trained through its end-of-turn token (the model's eos), nothing else is
    assert [tokenizer.decode(span) for span in spans] == ["Hello!<|im_end|>", "Paris.<|im_end|>"]
    assert tokenizer.eos_token == "<|im_end|>"
    # evaluation asks with the prompt before the last reply, as chat would
    encoded = encode_example(Example(messages), tokenizer, template, DataArgs(max_seq_length=512))
    assert encoded.prompt_ids == template.build_input_ids(tokenizer, messages[:4])


# -- collator --------------------------------------------------------------------------------------


def test_collator_pads_right():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = DataCollator(pad_token_id=0, attention_mask=True, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert "attention_mask" not in DataCollator(pad_token_id=0)(rows)


@needs_conformance
@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_right_padded_batches_give_each_row_its_own_logits(v1, v3, family):
    """The native ChatGLM forwards take a right-padded training batch without any mask."""
    from glmkit.models import load_model

    tokenizer, directory = (v1, V1_DIR) if family == "chatglm" else (v3, V3_DIR)
    model = load_model(directory / "checkpoint")
    examples = [
        Example(chat(("user", "你好"), ("assistant", "你好，我是助手"))),
        Example(chat(("user", "hi"), ("assistant", "hello"), ("user", "今天天气怎么样？"), ("assistant", "晴"))),
    ]
    rows = tokenize_examples(examples, tokenizer, family, DataArgs())
    batch = DataCollator.for_tokenizer(tokenizer)(rows)
    with torch.no_grad():
        batched = model(batch["input_ids"]).logits
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(batched[i, : len(row["input_ids"])], alone, atol=1e-4, rtol=1e-3)
