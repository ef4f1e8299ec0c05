"""The ``glmkit`` command line."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from glmkit.errors import GlmkitError

app = typer.Typer(
    help="Run, serve and fine-tune ChatGLM-family and Hugging Face chat models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[
    str | None, typer.Option("--model", "-m", help="Model directory or hub id; default: the bundled demo model.")
]
SourceOption = Annotated[str, typer.Option(help="Where hub ids come from: huggingface or modelscope.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOption = Annotated[str, typer.Option(help="auto, fp32, fp16 or bf16.")]
MaxActiveOption = Annotated[int, typer.Option(min=1, help="Requests decoded together.")]
MaxQueueOption = Annotated[int, typer.Option(min=0, help="Requests waiting beyond those; more are turned away.")]
NumGpusOption = Annotated[int, typer.Option(min=1, help="Split a ChatGLM model over this many CUDA GPUs.")]
AdapterOption = Annotated[
    Path | None, typer.Option(help="What glmkit train wrote: a LoRA adapter or a P-Tuning v2 checkpoint directory.")
]
TemplateOption = Annotated[
    str | None, typer.Option(help="Prompt template (hf, chatglm, chatglm2, chatglm3, characterglm); default: detected.")
]


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
) -> None:
    """glmkit: one tool to chat with, serve and fine-tune GLM-family and Hugging Face chat models."""


def _load_chat_model(model, template, ptuning_checkpoint, device, dtype, num_gpus, source, adapter):
    from glmkit.chat import load

    return load(
        model,
        device=device,
        dtype=dtype,
        template=template,
        source=source,
        ptuning_checkpoint=ptuning_checkpoint,
        num_gpus=num_gpus,
        adapter=adapter,
    )


@app.command()
def chat(
    model: ModelOption = None,
    query: Annotated[str | None, typer.Option("--query", "-q", help="Answer this one question and exit.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    character: Annotated[
        Path | None, typer.Option(help="CharacterGLM card: JSON with bot_name, user_name, bot_info, user_info.")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Most tokens in one reply.")] = None,
    max_length: Annotated[int | None, typer.Option(min=1, help="Most tokens of prompt and reply together.")] = None,
    temperature: Annotated[float | None, typer.Option(min=0, help="0 means greedy.")] = None,
    top_p: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    top_k: Annotated[int | None, typer.Option(min=0)] = None,
    repetition_penalty: Annotated[float | None, typer.Option(min=0.01)] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop the reply at this text (repeatable).")] = None,
    template: TemplateOption = None,
    ptuning_checkpoint: Annotated[Path | None, typer.Option(help="P-Tuning v2 checkpoint directory.")] = None,
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    num_gpus: NumGpusOption = 1,
    source: SourceOption = "huggingface",
) -> None:
    """Chat in the terminal (streaming). 'clear' empties the history, 'stop' quits, Ctrl-C cuts a reply."""
    from glmkit.repl import run_repl, stream_answer
    from glmkit.templates.characterglm import read_card

    card = read_card(character) if character else None
    piped = query is None and not sys.stdin.isatty()
    if piped:
        query = sys.stdin.read().strip()
        if not query:
            raise GlmkitError("no question on standard input")
    template = template or ("characterglm" if card else None)
    chat_model = _load_chat_model(model, template, ptuning_checkpoint, device, dtype, num_gpus, source, adapter)
    options: dict[str, Any] = {
        "system": system,
        "character": card,
        "max_new_tokens": max_new_tokens,
        "max_length": max_length,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "stop": stop,
    }
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


@app.command()
def serve(
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="GLMKIT_API_KEY", help="Require 'Authorization: Bearer KEY' on every route but /health."),
    ] = None,
    cors: Annotated[list[str] | None, typer.Option(help="Allow browser calls from this origin (repeatable).")] = None,
    web: Annotated[bool, typer.Option("--web", help="Also serve the browser chat at /web.")] = False,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Write prompt text to the access log.")] = False,
    max_active: MaxActiveOption = 16,
    max_queue: MaxQueueOption = 64,
    template: TemplateOption = None,
    ptuning_checkpoint: Annotated[Path | None, typer.Option(help="P-Tuning v2 checkpoint directory.")] = None,
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    num_gpus: NumGpusOption = 1,
    source: SourceOption = "huggingface",
) -> None:
    """HTTP API: the ChatGLM 'POST /' contract and an OpenAI-compatible /v1 (streaming, concurrent)."""
    from glmkit.serve.server import ServerOptions, run_server

    chat_model = _load_chat_model(model, template, ptuning_checkpoint, device, dtype, num_gpus, source, adapter)
    run_server(
        chat_model,
        ServerOptions(
            host=host,
            port=port,
            api_key=api_key or None,
            cors_origins=list(cors or []),
            web=web,
            log_prompts=log_prompts,
            max_active=max_active,
            max_queue=max_queue,
        ),
    )


@app.command()
def web(
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 7860,
    max_active: MaxActiveOption = 16,
    max_queue: MaxQueueOption = 64,
    template: TemplateOption = None,
    ptuning_checkpoint: Annotated[Path | None, typer.Option(help="P-Tuning v2 checkpoint directory.")] = None,
    adapter: AdapterOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    num_gpus: NumGpusOption = 1,
    source: SourceOption = "huggingface",
) -> None:
    """Browser chat page (Gradio): streaming replies, history, sliders, system prompt, character cards."""
    from glmkit.web.app import run_web

    chat_model = _load_chat_model(model, template, ptuning_checkpoint, device, dtype, num_gpus, source, adapter)
    run_web(chat_model, host=host, port=port, max_active=max_active, max_queue=max_queue)


@app.command()
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


@app.command("train", context_settings={"help_option_names": ["--help", "-h"]})
def train_command(**values: Any) -> None:
    """Fine-tune a model: LoRA, P-Tuning v2, freeze or full (flags or --config run.yaml; flags win)."""
    from glmkit.train.commands import run_train

    run_train(values)


train_command.__signature__ = _train_signature()  # the flags come from the settings dataclasses


@app.command()
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
