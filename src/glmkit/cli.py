"""The ``glmkit`` command line."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from glmkit import progress
from glmkit.engine.config import GenerationConfig
from glmkit.errors import GlmkitError
from glmkit.train.examples import DataArgs

VERBOSE = False  # --verbose, set by main_options before any command runs


def _flags_take_no_value(params: list[Any]) -> list[Any]:
    # typer shows a flag as <bool>, as if "--web true" were taken: a flag's placeholder is empty
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))


# two or three examples under each verb's --help
EXAMPLES = {
    "chat": [
        ("glmkit chat", "chat with the bundled demo model"),
        ('glmkit chat -m THUDM/chatglm3-6b --system "Answer briefly."', "a hub model, with a system prompt"),
        ('glmkit chat -q "What is the capital of France?" --temperature 0', "one question, a greedy answer"),
    ],
    "serve": [
        ("glmkit serve --web", "the API and the browser chat at http://127.0.0.1:8000/web/"),
        ('glmkit serve -m /models/chatglm3-6b --host 0.0.0.0 --api-key "$KEY"', "reachable from the network"),
        ("glmkit serve --config serve.yaml --port 9000", "settings from a file, one of them overridden"),
    ],
    "web": [
        ("glmkit web", "the chat page alone, at http://127.0.0.1:7860/"),
        ("glmkit web -m /models/CharacterGLM-6B --port 7861", "role-play with character cards"),
    ],
    "download": [
        ("glmkit download THUDM/chatglm3-6b", "into the Hugging Face cache, resuming a broken download"),
        ("glmkit download ZhipuAI/chatglm3-6b --source modelscope", "from ModelScope"),
    ],
    "models": [("glmkit models", "what is cached, with sizes"), ("HF_HOME=/data/hf glmkit models", "another cache")],
    "data inspect": [
        ("glmkit data inspect train.json", "format, lengths, and two rows with their loss tokens marked"),
        ("glmkit data inspect train.json -m /models/chatglm3-6b --rows 5", "as that model's template tokenizes it"),
    ],
    "data tokenize": [
        ("glmkit data tokenize train.json -o tokens.jsonl", "with the demo model's tokenizer"),
        ("glmkit data tokenize train.json -o tokens.jsonl -m /models/chatglm3-6b", "with ChatGLM3's"),
    ],
    "data convert": [
        ("glmkit data convert alpaca.json train.jsonl", "JSON lines, row by row"),
        ("glmkit data convert sharegpt.json train.jsonl --to-messages", "as {'messages': [...]} rows"),
    ],
    "eval": [
        ("glmkit eval --data dev.json --output eval/ -m /models/chatglm3-6b", "greedy replies, ROUGE and BLEU-4"),
        ("glmkit eval --data dev.json --output eval/ -m BASE --adapter out/lora", "after fine-tuning"),
    ],
    "quantize": [
        ("glmkit quantize --bits 4 -m /models/chatglm3-6b -o chatglm3-int4", "INT4 in groups of 32"),
        ("glmkit quantize --bits 8 -m /models/chatglm3-6b -o chatglm3-int8", "INT8"),
    ],
    "bench": [
        ("glmkit bench", "ChatGLM3-6B's shape on a GPU (the demo model on a CPU); updates docs/benchmarks.md"),
        ("glmkit bench --shape glm4-9b --figures ttft,streams --streams 1,64 --no-docs",
         "another shape, some figures, print only"),
        ("glmkit bench --quick --skip-transformers --json bench.json", "a short run, every figure as JSON"),
    ],
    "env": [("glmkit env", "paste its output into bug reports"), ("glmkit --version", "the version alone")],
    "train": [
        ("glmkit train --config recipes/alpaca_lora.yaml", "a recipe"),
        ("glmkit train --config recipes/alpaca_lora.yaml --max-steps 50", "a recipe, one setting changed"),
        ("glmkit train --model /models/chatglm3-6b --data train.json --method lora --output-dir out/lora", "flags"),
    ],
    "export": [
        ("glmkit export --adapter out/lora --output merged/", "into the base model the adapter names"),
        ("glmkit export --adapter out/lora --output merged/ -m /models/chatglm3-6b", "into another copy of it"),
    ],
}


def _examples(verb: str) -> str:
    from rich.markup import escape

    lines = [f"{what[:1].upper()}{what[1:]}:\n    {command}" for command, what in EXAMPLES[verb]]
    return escape("Examples:\n" + "\n".join(lines))


app = typer.Typer(
    help="Run, serve and fine-tune ChatGLM-family and Hugging Face chat models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", envvar="GLMKIT_MODEL", help="Model directory or hub id; default: the bundled demo model."
    ),
]
HostOption = Annotated[
    str, typer.Option(envvar="GLMKIT_HOST", help="Address to bind; 0.0.0.0 exposes the server to the network.")
]
PortOption = Annotated[int, typer.Option(min=0, max=65535, envvar="GLMKIT_PORT", help="Port to listen on.")]
SourceOption = Annotated[str, typer.Option(help="Where hub ids come from: huggingface or modelscope.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOption = Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16.")]
MaxActiveOption = Annotated[int, typer.Option(min=1, help="Requests decoded together.")]
MaxQueueOption = Annotated[int, typer.Option(min=0, help="Requests waiting beyond those; more are turned away.")]
KvCacheGbOption = Annotated[
    float | None,
    typer.Option(
        min=0.001,
        help="GiB for the KV cache, fixed at start (it holds up to --max-active requests of --max-model-len "
        "tokens); default: 80% of the GPU memory free after loading, 2 GiB on a CPU.",
    ),
]
PrefillChunkOption = Annotated[
    int, typer.Option(min=1, help="Prompt tokens prefilled between two decode steps while others stream.")
]
CorsOption = Annotated[
    list[str] | None,
    typer.Option(metavar="<origin>", help="Allow browser calls from this origin (repeatable); none by default."),
]
NumGpusOption = Annotated[int, typer.Option(min=1, help="Split a ChatGLM model over this many CUDA GPUs.")]
QuantizeOption = Annotated[
    int | None, typer.Option(help="Quantize the decoder linears while loading: 8 (INT8) or 4 (INT4, groups of 32).")
]
AdapterOption = Annotated[
    Path | None, typer.Option(help="What glmkit train wrote: a LoRA adapter or a P-Tuning v2 checkpoint directory.")
]
_DEFAULTS = GenerationConfig()
MaxNewTokensOption = Annotated[
    int | None,
    typer.Option(min=1, help=f"Most tokens in one reply; default {_DEFAULTS.max_new_tokens}, or the checkpoint's own."),
]
MaxLengthOption = Annotated[
    int | None, typer.Option(min=1, help="Most tokens of prompt and reply together (the ChatGLM convention).")
]
TemperatureOption = Annotated[
    float | None,
    typer.Option(min=0, help=f"0 means greedy; default {_DEFAULTS.temperature}, or the checkpoint's own."),
]
TopPOption = Annotated[
    float | None,
    typer.Option(min=0, max=1, help=f"Sample from the smallest set of tokens this likely; default {_DEFAULTS.top_p}."),
]
TopKOption = Annotated[
    int | None, typer.Option(min=0, help=f"Sample from this many likeliest tokens, 0 = all; default {_DEFAULTS.top_k}.")
]
RepetitionPenaltyOption = Annotated[
    float | None,
    typer.Option(
        min=0.01, help=f"Above 1 makes repeating earlier tokens less likely; default {_DEFAULTS.repetition_penalty}."
    ),
]
SeedOption = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
ThreadsOption = Annotated[
    int | None, typer.Option(min=1, help="CPU threads for the model; default: half the cores for a server.")
]


def _set_threads(threads: int | None, server: bool) -> None:
    """torch's intra-op threads.  A server defaults to half the cores: its event loop, tokenizer and
    clients need CPU too, and on a busy machine torch's default (every core) spins against them
    (measured on 2 shared cores: a first reply in 18 s with 2 threads, 0.7 s with 1)."""
    import os

    import torch

    if threads is None and server:
        threads = max(1, (os.cpu_count() or 1) // 2)
    if threads is not None:
        torch.set_num_threads(threads)
TemplateOption = Annotated[
    str | None,
    typer.Option(help="Prompt template (hf, chatglm, chatglm2, chatglm3, characterglm, glm4); default: detected."),
]


def with_options(group: type, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add every field of the dataclass ``group`` to a command as ``--field-name`` (the field's type,
    default and ``metadata["help"]``), and hand the command one ``group`` instance as its ``name``
    parameter: a settings group is declared once, in its dataclass, for the CLI and for Python."""
    from glmkit.train.commands import field_parameters

    fields = dataclasses.fields(group)
    options = field_parameters(group)

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != name]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            settings = group(**{field.name: values.pop(field.name) for field in fields})
            return command(**values, **{name: settings})

        run.__signature__ = inspect.Signature([*own, *options])  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in [*own, *options]}
        return run

    return decorate


def _version(value: bool) -> None:
    if value:
        from glmkit import __version__

        typer.echo(f"glmkit {__version__}")
        raise typer.Exit()


def _train_signature():
    from glmkit.train.commands import train_parameters

    return train_parameters()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Also show other libraries' progress bars, warnings and uvicorn's start-up lines."
        ),
    ] = False,
) -> None:
    """glmkit: one tool to chat with, serve and fine-tune GLM-family and Hugging Face chat models."""
    global VERBOSE
    VERBOSE = verbose
    if not verbose:
        progress.quiet_other_libraries()
    if sys.stderr.isatty():  # bars are for a person at a terminal; logs and pipes get none
        progress.enable()


def _load_chat_model(model, template, ptuning_checkpoint, device, dtype, num_gpus, source, quantize=None, adapter=None):
    from glmkit.chat import load

    return load(
        model,
        device=device,
        dtype=dtype,
        template=template,
        source=source,
        ptuning_checkpoint=ptuning_checkpoint,
        num_gpus=num_gpus,
        quantize=quantize,
        adapter=adapter,
    )


@app.command(cls=_Command, epilog=_examples("chat"))
def chat(
    model: ModelOption = None,
    query: Annotated[str | None, typer.Option("--query", "-q", help="Answer this one question and exit.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    character: Annotated[
        Path | None, typer.Option(help="CharacterGLM card: JSON with bot_name, user_name, bot_info, user_info.")
    ] = None,
    max_new_tokens: MaxNewTokensOption = None,
    max_length: MaxLengthOption = None,
    temperature: TemperatureOption = None,
    top_p: TopPOption = None,
    top_k: TopKOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: SeedOption = None,
    stop: Annotated[
        list[str] | None, typer.Option(metavar="<text>", help="Stop the reply at this text (repeatable).")
    ] = None,
    template: TemplateOption = None,
    ptuning_checkpoint: Annotated[Path | None, typer.Option(help="P-Tuning v2 checkpoint directory.")] = None,
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    num_gpus: NumGpusOption = 1,
    quantize: QuantizeOption = None,
    source: SourceOption = "huggingface",
    threads: ThreadsOption = None,
) -> None:
    """Chat in the terminal (streaming). 'clear' empties the history, 'stop' quits, Ctrl-C cuts a reply."""
    from glmkit.chat import check_text
    from glmkit.repl import run_repl, stream_answer
    from glmkit.templates.characterglm import read_card

    card = read_card(character) if character else None
    generation: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "max_length": max_length,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "stop": stop,
    }
    GenerationConfig().updated(**generation)  # a bad setting is refused before the model loads
    piped = query is None and not sys.stdin.isatty()
    if piped:
        try:
            query = sys.stdin.buffer.read().decode("utf-8").strip()
        except UnicodeDecodeError:
            raise GlmkitError("standard input is not UTF-8 text") from None
        if not query:
            raise GlmkitError("no question on standard input")
    if query is not None:
        check_text(query, "the question")
    if system is not None:
        check_text(system, "the system prompt")
    template = template or ("characterglm" if card else None)
    _set_threads(threads, server=False)
    chat_model = _load_chat_model(
        model, template, ptuning_checkpoint, device, dtype, num_gpus, source, quantize=quantize, adapter=adapter
    )
    options: dict[str, Any] = {"system": system, "character": card, **generation}
    if query is not None:
        try:
            stream_answer(chat_model, query, [], sys.stdout, **options)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        return
    run_repl(
        chat_model,
        options,
        greeting=(card or {}).get("greeting"),
        bot_name=(card or {}).get("bot_name", ""),
    )


@app.command(cls=_Command, epilog=_examples("serve"))
def serve(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML file with the same keys as these flags (max_active: 32, ...); flags override it."),
    ] = None,
    model: ModelOption = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="GLMKIT_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but /health."),
    ] = None,
    cors: CorsOption = None,
    web: Annotated[bool, typer.Option("--web", help="Also serve the browser chat at /web.")] = False,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Write prompt text to the access log.")] = False,
    max_active: MaxActiveOption = 16,
    max_queue: MaxQueueOption = 64,
    kv_cache_gb: KvCacheGbOption = None,
    prefill_chunk: PrefillChunkOption = 2048,
    max_model_len: Annotated[
        int, typer.Option(min=2, help="Most tokens of prompt and reply in one request (capped by the model's own).")
    ] = 4096,
    shutdown_grace: Annotated[
        float, typer.Option(min=0, help="Seconds running replies get on Ctrl-C/SIGTERM before they are cut.")
    ] = 5.0,
    template: TemplateOption = None,
    ptuning_checkpoint: Annotated[Path | None, typer.Option(help="P-Tuning v2 checkpoint directory.")] = None,
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    num_gpus: NumGpusOption = 1,
    quantize: QuantizeOption = None,
    source: SourceOption = "huggingface",
    threads: ThreadsOption = None,
) -> None:
    """HTTP API: the ChatGLM 'POST /' contract and an OpenAI-compatible /v1 (streaming, concurrent)."""
    from glmkit.serve.server import ServerOptions, bind, run_server

    given = _with_config_file(ctx, config)
    sock = bind(given["host"], given["port"])  # a busy port is told now, not after the model has loaded
    _set_threads(given["threads"], server=True)
    chat_model = _load_chat_model(
        given["model"],
        given["template"],
        given["ptuning_checkpoint"],
        given["device"],
        given["dtype"],
        given["num_gpus"],
        given["source"],
        quantize=given["quantize"],
        adapter=given["adapter"],
    )
    run_server(
        chat_model,
        ServerOptions(
            host=given["host"],
            port=given["port"],
            api_key=given["api_key"] or None,
            cors_origins=list(given["cors"] or []),
            web=given["web"],
            log_prompts=given["log_prompts"],
            max_active=given["max_active"],
            max_queue=given["max_queue"],
            kv_cache_gb=given["kv_cache_gb"],
            prefill_chunk=given["prefill_chunk"],
            max_model_len=given["max_model_len"],
            shutdown_grace_seconds=given["shutdown_grace"],
            verbose=VERBOSE,
        ),
        sock,
    )


def _with_config_file(ctx: typer.Context, path: Path | None) -> dict[str, Any]:
    """The command's values, with those of the YAML file ``path`` where neither a flag nor an environment
    variable set them; a file value is checked as the flag's would be."""
    from glmkit.train.args import read_config_file

    values = dict(ctx.params)
    if path is None:
        return values
    params = {param.name: param for param in ctx.command.params if param.name != "config"}
    file_values = read_config_file(path)
    unknown = sorted(set(file_values) - set(params))
    if unknown:
        raise GlmkitError(f"{path}: unknown settings {', '.join(unknown)}; known: {', '.join(sorted(params))}")
    for name, value in file_values.items():
        source = ctx.get_parameter_source(name)
        if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT"):
            try:
                values[name] = params[name].process_value(ctx, value)
            except typer.BadParameter as exc:
                raise GlmkitError(f"{path}: {name}: {exc.message}") from None
    return values


@app.command(cls=_Command, epilog=_examples("web"))
def web(
    model: ModelOption = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 7860,
    cors: CorsOption = None,
    max_active: MaxActiveOption = 16,
    max_queue: MaxQueueOption = 64,
    kv_cache_gb: KvCacheGbOption = None,
    template: TemplateOption = None,
    ptuning_checkpoint: Annotated[Path | None, typer.Option(help="P-Tuning v2 checkpoint directory.")] = None,
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    num_gpus: NumGpusOption = 1,
    quantize: QuantizeOption = None,
    source: SourceOption = "huggingface",
    threads: ThreadsOption = None,
) -> None:
    """Browser chat page (Gradio): streaming replies, history, sliders, system prompt, character cards."""
    from glmkit.serve.server import ServerOptions, bind, run_server

    sock = bind(host, port)
    _set_threads(threads, server=True)
    chat_model = _load_chat_model(
        model, template, ptuning_checkpoint, device, dtype, num_gpus, source, quantize=quantize, adapter=adapter
    )
    # glmkit serve's server with the page alone: the same limits, CORS policy and shutdown
    options = ServerOptions(
        host=host,
        port=port,
        cors_origins=list(cors or []),
        web=True,
        api=False,
        max_active=max_active,
        max_queue=max_queue,
        kv_cache_gb=kv_cache_gb,
        verbose=VERBOSE,
    )
    run_server(chat_model, options, sock)


data_app = typer.Typer(help="Look at, tokenize and convert fine-tuning data.", no_args_is_help=True, cls=_Group)
app.add_typer(data_app, name="data")
DataFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSON, JSON lines or CSV data file.")]


def _tokenize_file(file: Path, model: str | None, source: str, data_args: DataArgs) -> tuple[Any, Any, Any, Any]:
    """A data file's examples, the model's tokenizer and template (no weights loaded), the tokenized rows."""
    from glmkit.train.data import load_examples, load_tokenizer_and_template, tokenize_examples

    examples = load_examples(file, data_args)
    tokenizer, template = load_tokenizer_and_template(model, data_args, source=source)
    return examples, tokenizer, template, tokenize_examples(examples, tokenizer, template, data_args)


@data_app.command("inspect", cls=_Command, epilog=_examples("data inspect"))
@with_options(DataArgs, "data_args")
def data_inspect(
    file: DataFile,
    model: ModelOption = None,
    rows: Annotated[int, typer.Option(min=0, help="Rows to show with their loss tokens marked.")] = 2,
    source: SourceOption = "huggingface",
    *,
    data_args: DataArgs,
) -> None:
    """Format, row count, token lengths, what the limits cut, and rows with their loss tokens marked."""
    from rich.console import Console

    from glmkit.train.report import print_inspection

    examples, tokenizer, template, tokenized = _tokenize_file(file, model, source, data_args)
    print_inspection(Console(), str(file), examples, tokenized, tokenizer, template.name, data_args, shown=rows)


@data_app.command("tokenize", cls=_Command, epilog=_examples("data tokenize"))
@with_options(DataArgs, "data_args")
def data_tokenize(
    file: DataFile,
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON lines file to write.")],
    model: ModelOption = None,
    source: SourceOption = "huggingface",
    *,
    data_args: DataArgs,
) -> None:
    """Write one JSON line per row with input_ids and labels (-100: no loss), exactly what training feeds."""
    from glmkit.train.reading import write_jsonl

    examples, _, template, tokenized = _tokenize_file(file, model, source, data_args)
    write_jsonl(output, tokenized)
    stats = tokenized.stats
    typer.echo(
        f"{output}: {stats.rows} rows ({template.name} layout); {len(examples.skipped) + len(stats.skipped)} bad rows "
        f"skipped, {stats.truncated} truncated, {len(stats.dropped)} dropped by the limits"
    )


@data_app.command("convert", cls=_Command, epilog=_examples("data convert"))
@with_options(DataArgs, "data_args")
def data_convert(
    file: DataFile,
    output: Annotated[Path, typer.Argument(help="JSON lines file to write.")],
    to_messages: Annotated[
        bool, typer.Option("--to-messages", help="Write every format as {'messages': [...]} rows.")
    ] = False,
    *,
    data_args: DataArgs,
) -> None:
    """Any data file to JSON lines: alpaca JSON and CSV row by row, ShareGPT to the messages format."""
    from glmkit.train.convert import convert_file

    fmt, count = convert_file(file, output, data_args, to_messages=to_messages)
    typer.echo(f"{output}: {count} rows ({fmt})")


@app.command("eval", cls=_Command, epilog=_examples("eval"))
@with_options(DataArgs, "data_args")
def eval_command(
    data: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Data file with the reference replies.")],
    output: Annotated[Path, typer.Option(help="Directory for metrics.json and generated_predictions.jsonl.")],
    model: ModelOption = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="Most tokens in one reply; default: --max-target-length.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(min=0, help="Above 0 samples; default 0 (greedy).")] = None,
    top_p: TopPOption = None,
    top_k: TopKOption = None,
    repetition_penalty: RepetitionPenaltyOption = None,
    seed: SeedOption = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows generated together.")] = 8,
    adapter: AdapterOption = None,
    ptuning_checkpoint: Annotated[Path | None, typer.Option(help="P-Tuning v2 checkpoint directory.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    quantize: QuantizeOption = None,
    source: SourceOption = "huggingface",
    *,
    data_args: DataArgs,
) -> None:
    """Generate a reply for every row (batched), score ROUGE-1/2/L and BLEU-4, write the predictions."""
    from glmkit.train.data import load_examples
    from glmkit.train.evaluate import METRICS_FILE, PREDICTIONS_FILE, evaluate

    examples = load_examples(data, data_args)
    template = data_args.template or ("characterglm" if data_args.character else None)
    chat_model = _load_chat_model(
        model, template, ptuning_checkpoint, device, dtype, 1, source, quantize=quantize, adapter=adapter
    )
    sampling = temperature is not None and temperature > 0
    config = chat_model.generation(
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        max_new_tokens=max_new_tokens or data_args.max_target_length,
    )
    if examples.skipped:
        typer.echo(f"{len(examples.skipped)} bad rows skipped; the first: {examples.skipped[0]}", err=True)
    metrics = evaluate(chat_model, examples, data_args, config, output, batch_size=batch_size)
    typer.echo(", ".join(f"{key} {round(value, 4)}" for key, value in metrics.items()))
    typer.echo(f"wrote {output / METRICS_FILE} and {output / PREDICTIONS_FILE}")


@app.command(cls=_Command, epilog=_examples("download"))
def download(
    model: Annotated[str, typer.Argument(help="Hub id (owner/name); 'demo' prepares the bundled demo model.")],
    source: SourceOption = "huggingface",
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit; default: the main branch.")] = None,
) -> None:
    """Fetch a checkpoint into the cache (with progress; a broken download resumes), without loading it."""
    from glmkit.hub import resolve_model

    folder = resolve_model(model, source=source, revision=revision)
    typer.echo(f"{model}: {folder}")


@app.command(cls=_Command, epilog=_examples("models"))
def models() -> None:
    """The models in the caches (demo, Hugging Face, ModelScope), with their sizes on disk."""
    from glmkit.hub import cached_models

    found = cached_models()
    if not found:
        typer.echo("no models cached yet: glmkit download OWNER/NAME fetches one")
        return
    width = max(len(name) for name, *_ in found)
    for name, where, size, path in found:
        typer.echo(f"{name:<{width}}  {where:<11}  {size / 1e6:>9.1f} MB  {path}")


@app.command("quantize", cls=_Command, epilog=_examples("quantize"))
def quantize_checkpoint(
    bits: Annotated[int, typer.Option(help="8 (INT8 per output channel) or 4 (INT4 in groups).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New directory for the quantized checkpoint.")],
    model: ModelOption = None,
    group_size: Annotated[int | None, typer.Option(help="INT4 group size: 32, 64 or 128 (default 32).")] = None,
    source: SourceOption = "huggingface",
) -> None:
    """Write a quantized checkpoint (safetensors + config + tokenizer) that loads without the float weights."""
    from glmkit.hub import resolve_model
    from glmkit.models.quantized_checkpoint import write_quantized_checkpoint

    if group_size is not None and bits != 4:
        raise GlmkitError("--group-size applies to --bits 4 only")
    written = write_quantized_checkpoint(resolve_model(model, source=source), output, bits, group_size)
    typer.echo(f"wrote {written} (INT{bits}); load it with: glmkit chat --model {written}")


@app.command(cls=_Command, epilog=_examples("bench"))
def bench(
    shape: Annotated[
        str | None,
        typer.Option(help="chatglm3-6b, chatglm-6b, glm4-9b (random bf16 weights) or demo; default: chatglm3-6b "
                     "on a GPU, demo on a CPU."),
    ] = None,
    streams: Annotated[
        str | None,
        typer.Option(help="Concurrent stream counts through the scheduler; default 1,8,32,64,256 (1,4,8 on a CPU)."),
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="One run of few tokens each; on a CPU a tiny model of a GPU shape's family.")
    ] = False,
    skip_transformers: Annotated[bool, typer.Option("--skip-transformers", help="Leave transformers out.")] = False,
    figures: Annotated[
        str | None,
        typer.Option(help="Only these of batch1, ttft, streams (comma list; default all): a run split over "
                     "several shorter ones, each with its own docs section."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write every figure to this JSON file.")] = None,
    docs: Annotated[
        Path | None,
        typer.Option(help="Markdown file whose section for this device and shape is replaced (or appended); "
                     "default: docs/benchmarks.md if it exists here."),
    ] = None,
    no_docs: Annotated[bool, typer.Option("--no-docs", help="Print only; write no docs section.")] = False,
    threads: ThreadsOption = None,
) -> None:
    """Measure decode speed, time to first token and streams beside the device's limits and transformers."""
    import json
    import shlex

    from glmkit.bench.report import markdown_table, notes, write_docs, write_whole
    from glmkit.bench.run import make_plan, run

    if docs is not None and no_docs:
        raise GlmkitError("--docs and --no-docs together: give one")
    plan = make_plan(shape, streams, quick, skip_transformers, figures)  # all flags checked before a model is built
    _set_threads(threads, server=False)
    if docs is None and not no_docs and Path("docs/benchmarks.md").is_file():
        docs = Path("docs/benchmarks.md")
    # a run takes minutes: its section lines go to stderr even when that is a log file, not a terminal
    say = progress.enable().say

    def keep(report: dict) -> None:  # after every figure: a run stopped part way keeps what it measured
        if json_out is not None:
            write_whole(json_out, json.dumps(report, indent=1) + "\n")
        if docs is not None:
            write_docs(docs, report)

    report = run(plan, "glmkit " + shlex.join(sys.argv[1:]), say, keep)
    keep(report)
    typer.echo(markdown_table(report) + "\n\n" + notes(report))
    if json_out is not None:
        say(f"wrote {json_out}")
    if docs is not None:
        say(f"wrote the {report['device']} {report['shape']} section of {docs}")


@app.command(cls=_Command, epilog=_examples("env"))
def env() -> None:
    """Versions and devices, for bug reports."""
    import torch
    import transformers

    from glmkit import __version__
    from glmkit.demo_model import cache_root, demo_model_dir

    demo = demo_model_dir()
    rows = {
        "glmkit": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda available": torch.cuda.is_available(),
        "cuda version": torch.version.cuda,
        "gpus": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
        "mps available": torch.backends.mps.is_available(),
        "glmkit cache": cache_root(),
        "demo model": f"{demo} ({'converted' if (demo / 'model.safetensors').is_file() else 'not converted yet'})",
    }
    width = max(map(len, rows))
    for key, value in rows.items():
        typer.echo(f"{key:<{width}}  {value}")


@app.command(
    "train", cls=_Command, epilog=_examples("train"), context_settings={"help_option_names": ["--help", "-h"]}
)
def train_command(**values: Any) -> None:
    """Fine-tune a model: LoRA, P-Tuning v2, freeze or full (flags or --config run.yaml; flags win)."""
    from glmkit.train.commands import run_train

    run_train(values)


train_command.__signature__ = _train_signature()  # the flags come from the settings dataclasses


@app.command(cls=_Command, epilog=_examples("export"))
def export(
    adapter: Annotated[Path, typer.Option(help="LoRA adapter directory (from glmkit train).")],
    output: Annotated[Path, typer.Option(help="Where the merged model goes (a new directory).")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model; default: the one the adapter names.")
    ] = None,
    device: DeviceOption = "cpu",
) -> None:
    """Merge a LoRA adapter into its base model and write a model directory in the original format."""
    from glmkit.train.export import export_merged

    typer.echo(f"merged model written to {export_merged(adapter, output, model=model, device=device)}")


def main() -> None:
    """Console entry point: user mistakes become one 'error:' line and exit code 2, not a traceback."""
    try:
        app()
    except GlmkitError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
