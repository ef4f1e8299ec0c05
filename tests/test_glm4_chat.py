"""GLM-4 through everything else, unchanged: chat, tool calls, both HTTP contracts, the batched scheduler
and fine-tuning, on tiny GLM-4 checkpoints with the real glm-4-9b-chat tokenizer.

A "scripted" checkpoint makes the replies known: its attention and MLP weights are zero, so the logits
depend on the last token only, and the embeddings and output layer chain ``<|assistant|>`` to a fixed
reply (a tool call) ending in ``<|observation|>``. Data: ``../shared/conformance/glm4``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
import torch
from conftest import GLM4_DIR, GLM4_TOOLS, live_server, needs_conformance
from safetensors.torch import save_file
from train_helpers import fit, logits_of

import glmkit
from glmkit.chat import ChatModel
from glmkit.models.chatglm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmkit.serve import ServerOptions, create_app

pytestmark = needs_conformance

CALL = 'get_weather\n{"city": "北京"}'
ASSISTANT, OBSERVATION = 151337, 151338


def glm4_dir(directory: Path, tensors, **sizes) -> Path:
    """A GLM-4 checkpoint directory: official config fields, ``tensors(model)`` as weights, the real
    tokenizer beside them and a generation_config.json as the hub repo has one."""
    config = json.loads((GLM4_DIR / "chatglm_cpp_tiny" / "config.json").read_text())
    config |= {"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "kv_channels": 16}
    config |= {"multi_query_group_num": 1, "ffn_hidden_size": 32, "padded_vocab_size": 151552, "seq_length": 512}
    config |= {"layernorm_epsilon": 1e-5} | sizes
    with torch.device("meta"):
        model = ChatGLM2ForConditionalGeneration(ChatGLM2Config.from_dict(config))
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors(model), str(directory / "model.safetensors"))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (directory / name).symlink_to(GLM4_DIR / "tokenizer" / name)
    generation = {"eos_token_id": config["eos_token_id"], "do_sample": True, "temperature": 0.6, "top_p": 0.8}
    (directory / "generation_config.json").write_text(json.dumps(generation | {"max_length": 128000}))
    return directory


def random_weights(model) -> dict[str, torch.Tensor]:
    """N(0, 0.3) weights, norms near 1, and an output layer of N(0, 1): behind the final RMSNorm a smaller
    one caps every logit near 10, too little for any answer to stand out of 151552 ids."""
    generator = torch.Generator().manual_seed(0)
    scale = {"transformer.output_layer.weight": 1.0}
    return {
        name: (1.0 if "layernorm" in name else 0.0) + torch.randn(p.shape, generator=generator) * scale.get(name, 0.3)
        for name, p in model.named_parameters()
    }


def scripted_weights(chain: list[int]):
    """Zero attention and MLP; token ``chain[i]`` embeds as unit vector i and the output layer maps that
    vector to ``chain[i + 1]`` (RMSNorm makes it sqrt(hidden) long: logits ~57 there, 0 elsewhere)."""
    assert len(set(chain)) == len(chain), "each token of the chain must have one successor"

    def tensors(model) -> dict[str, torch.Tensor]:
        state = {name: torch.zeros(p.shape) for name, p in model.named_parameters()}
        for name in state:
            if "layernorm" in name:
                state[name] = torch.ones_like(state[name])
        embedding = state["transformer.embedding.word_embeddings.weight"]
        output = state["transformer.output_layer.weight"]
        for i, (token, following) in enumerate(pairwise(chain)):
            embedding[token, i] = 1.0
            output[following, i] = 10.0
        return state

    return tensors


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, glm4_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glm4")
    chain = [ASSISTANT, *glm4_tokenizer.encode(CALL, add_special_tokens=False), OBSERVATION]
    return {
        "scripted": glm4_dir(root / "scripted", scripted_weights(chain)),
        "random": glm4_dir(root / "random", random_weights, num_layers=2),
    }


@pytest.fixture(scope="module")
def scripted(dirs) -> ChatModel:
    return glmkit.load(dirs["scripted"], device="cpu")


@pytest.fixture(scope="module")
def random_model(dirs) -> ChatModel:
    return glmkit.load(dirs["random"], device="cpu")


# -- chat ---------------------------------------------------------------------------------------------


def test_load_detects_template_tokenizer_and_defaults(scripted):
    assert scripted.template.name == "glm4"
    assert type(scripted.tokenizer).__name__ == "GLM4Tokenizer"
    assert set(scripted.engine.stop_token_ids) == {151329, 151336, 151338}
    assert (scripted.generation_config.temperature, scripted.generation_config.top_p) == (0.6, 0.8)


def test_tool_call_round_trip_through_chat(scripted):
    history = [{"role": "system", "content": "", "tools": GLM4_TOOLS}]
    response, history = scripted.chat("北京天气怎么样？", history)
    assert response == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert history[-1] == {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'}
    # the tool's result goes back as an observation; the prompt holds the call as GLM-4 writes it
    prompt = scripted.tokenizer.decode(scripted.encode([*history, {"role": "observation", "content": "晴"}]))
    assert prompt.endswith('<|assistant|>get_weather\n{"city": "北京"}<|observation|>\n晴<|assistant|>')
    response, history = scripted.chat("晴，25 度", history, role="observation")
    assert isinstance(response, dict) and [m["role"] for m in history][-3:] == ["assistant", "observation", "assistant"]


def test_stream_chat_ends_with_the_whole_reply(scripted):
    history = [{"role": "system", "content": "", "tools": GLM4_TOOLS}]
    streamed = list(scripted.stream_chat("北京天气", history))
    assert len(streamed) > 3
    assert streamed[-1][0] == scripted.chat("北京天气", history)[0]
    # without tools offered, a named turn is returned as it came, as ChatGLM3 does
    assert scripted.chat("北京天气")[0] == {"name": "get_weather", "content": '{"city": "北京"}'}


def test_chat_on_a_random_glm4(random_model):
    response, history = random_model.chat("你好", temperature=0, max_new_tokens=8)
    assert isinstance(response, str)
    assert history[0] == {"role": "user", "content": "你好"} and history[-1]["role"] == "assistant"
    pairs = random_model.chat("再说一次", [("你好", "你好！")], temperature=0, max_new_tokens=4)[1]
    assert pairs[0] == ("你好", "你好！") and pairs[-1][0] == "再说一次"


# -- HTTP: both contracts, the batched scheduler --------------------------------------------------------


def test_both_contracts_carry_the_tool_call(scripted):
    with live_server(create_app(scripted, ServerOptions())) as url, httpx.Client(base_url=url, timeout=120) as http:
        legacy = http.post("/", json={"prompt": "北京天气", "history": []}).json()
        assert legacy["status"] == 200
        assert legacy["response"] == {"name": "get_weather", "content": '{"city": "北京"}'}
        system = {"role": "system", "content": "", "tools": GLM4_TOOLS}
        body = {"messages": [system, {"role": "user", "content": "北京天气"}]}
        choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "北京"}


def test_scheduler_batches_glm4_requests_like_single_ones(random_model):
    questions = ["你好", "北京在哪里？", "Tell me a story about a dragon.", "2+2=?", "写一首诗"]
    alone = [random_model.chat(q, temperature=0, max_new_tokens=6 + 2 * i)[0] for i, q in enumerate(questions)]
    # random replies can have a first line, which reads as a named turn (a dict); the server sends its JSON
    alone = [a if isinstance(a, str) else json.dumps(a, ensure_ascii=False) for a in alone]
    app = create_app(random_model, ServerOptions(max_active=4))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as http:

        def ask(i: int) -> str:
            body = {"messages": [{"role": "user", "content": questions[i]}], "temperature": 0, "max_tokens": 6 + 2 * i}
            return http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(len(questions)) as pool:
            together = list(pool.map(ask, range(len(questions))))
    assert app.state.scheduler.batched
    assert together == alone


# -- fine-tuning --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("lora", {"learning_rate": 2e-2, "max_steps": 25, "lora_dropout": 0.0}),
        ("ptuning", {"learning_rate": 1.0, "max_steps": 50, "pre_seq_len": 8}),
    ],
)
def test_finetuning_learns_an_answer(dirs, tmp_path, method, settings):
    """LoRA on query_key_value and P-Tuning v2, on the glm4 template's training layout."""
    model_dir = dirs["random"]
    chat_model = glmkit.load(model_dir, device="cpu")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好的"}]
    segments = chat_model.template.render_conversation(chat_model.tokenizer, messages)
    ids = [t for part, _ in segments for t in part]
    labels = [t if trained else -100 for part, trained in segments for t in part]
    assert ids[-1] == 151336 and labels[-1] == 151336  # finetune_demo ends a conversation with <|user|>
    rows = [{"input_ids": ids, "labels": labels}]
    result = fit(model_dir, tmp_path / "out", rows, 151329, method=method, lr_scheduler="constant", **settings)
    assert result.losses[-1] < 0.1 * result.losses[0], result.losses
    if method == "lora":
        adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
        assert adapter["target_modules"] == ["query_key_value"]
    tuned = glmkit.load(model_dir, device="cpu", adapter=tmp_path / "out")
    assert tuned.chat("你好", temperature=0, max_new_tokens=8)[0] == "好的"
    prompt = ids[: ids.index(151337) + 1]
    assert not torch.allclose(logits_of(tuned.model, prompt), logits_of(chat_model.model, prompt), atol=1e-3)


def test_tool_call_round_trip_through_the_openai_client(scripted):
    """OpenAI ``tools`` in, ``tool_calls`` out, the result back as a ``tool`` message. GLM-4 needs nothing
    of its own in the server: its template returns ChatGLM3's call shape."""
    import openai

    with live_server(create_app(scripted, ServerOptions())) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        question = [{"role": "user", "content": "北京天气怎么样？"}]
        first = client.chat.completions.create(model="glm4", messages=question, tools=GLM4_TOOLS)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "北京"}
        result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 25}'}
        second = client.chat.completions.create(
            model="glm4", messages=[*question, choice.message.model_dump(exclude_none=True), result], tools=GLM4_TOOLS
        )
        # the scripted model calls again; what matters is that the history with the call was accepted
        assert second.choices[0].message.tool_calls[0].function.name == "get_weather"
