"""What one ``glmkit bench`` run measures, in which order, and the ratios of each figure to its limit and
to transformers; the settings are checked (``make_plan``) before any model is built."""

from __future__ import annotations

import copy
import gc
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from glmkit.bench import measure
from glmkit.bench.peers import NO_PEER, transformers_peer
from glmkit.bench.report import FIGURES
from glmkit.bench.shapes import SHAPES, Shape, build, prompt, vocab_size
from glmkit.errors import GlmkitError, first_line
from glmkit.models.quantize import quantize_model

GPU_STREAMS = (1, 8, 32, 64, 256)
CPU_STREAMS = (1, 4, 8)  # the demo model on a few CPU cores


@dataclass(frozen=True)
class Plan:
    """The model, the device and the sizes of every measurement of a run."""

    shape: Shape
    device: str
    prompt_tokens: int  # batch-1 and streams
    new_tokens: int
    repeats: int  # runs a median is taken over
    ttft_tokens: int
    ttft_others: int  # streams decoding while the TTFT prompt arrives
    streams: tuple[int, ...]
    transformers: bool
    quick: bool
    figures: tuple[str, ...] = FIGURES

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32


def parse_streams(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` as stream counts; anything but a comma list of positive whole numbers is refused."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise GlmkitError(f"--streams must be a comma list of positive whole numbers such as 1,8,32, not {text!r}")
    return tuple(int(part) for part in parts)


def parse_figures(text: str) -> tuple[str, ...]:
    """``"ttft,streams"`` as figures of ``FIGURES``, in the order a run measures them."""
    names = {part.strip() for part in text.split(",")}
    if not names or not names <= set(FIGURES):
        raise GlmkitError(f"--figures must be a comma list of {', '.join(FIGURES)}, not {text!r}")
    return tuple(name for name in FIGURES if name in names)


def make_plan(
    shape: str | None, streams: str | None, quick: bool, skip_transformers: bool, figures: str | None = None
) -> Plan:
    """The run those flags ask for on this machine, or the user's mistake as a ``GlmkitError``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = shape or ("chatglm3-6b" if device == "cuda" else "demo")
    if name not in SHAPES:
        raise GlmkitError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    chosen = SHAPES[name]
    counts = parse_streams(streams) if streams is not None else None
    chosen_figures = parse_figures(figures) if figures is not None else FIGURES
    if chosen.gpu_gb and device == "cpu":
        if not quick:
            raise GlmkitError(
                f"the {name} shape holds {chosen.gpu_gb} GB of bf16 weights and needs a CUDA GPU; on a CPU run "
                f"--shape demo, or --quick for a tiny {name}-family model"
            )
        chosen = chosen.tiny()
    if quick:
        sizes = {"prompt_tokens": 16, "new_tokens": 8, "repeats": 1, "ttft_tokens": 64, "ttft_others": 3}
        default_streams = (1, 8) if device == "cuda" else (1, 4)
    else:
        others = 63 if device == "cuda" else 7
        sizes = {"prompt_tokens": 128, "new_tokens": 256, "repeats": 3, "ttft_tokens": 1024, "ttft_others": others}
        default_streams = GPU_STREAMS if device == "cuda" else CPU_STREAMS
    return Plan(chosen, device, streams=counts or default_streams, transformers=not skip_transformers,
                quick=quick, figures=chosen_figures, **sizes)  # fmt: skip


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    return f"{os.cpu_count()} CPU cores{f' ({model})' if model else ''}"


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.readlines()
    except OSError:
        return [platform.processor()]


def _ratio(value: float | None, limit: float | None) -> float | None:
    return round(value / limit, 3) if value and limit else None


def _release() -> None:
    """Give a dropped model's memory back, so that the next row's peak starts without it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(
    plan: Plan, command: str, say: Callable[[str], None], checkpoint: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Every measurement of ``plan`` (``command`` the line that asked for it, kept with the figures);
    ``say`` is told each finished figure with the seconds it took, and ``checkpoint`` gets the report so
    far after each, so that a run stopped part way (a time limit) keeps what it measured.  The report's
    ``complete`` is False until the last figure."""
    import transformers

    from glmkit import __version__

    device = torch.device(plan.device)
    report: dict[str, Any] = {
        "glmkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "device": plan.device, "device_name": device_name(plan.device),
        "torch_threads": torch.get_num_threads(), "shape": plan.shape.name,
        "config": plan.shape.config, "dtype": str(plan.dtype).removeprefix("torch."),
        "plan": {k: v for k, v in asdict(plan).items() if k != "shape"},
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "complete": False, "seconds": {},
    }  # fmt: skip
    last = time.perf_counter()

    def finished(figure: str, line: str) -> None:
        nonlocal last
        now = time.perf_counter()
        report["seconds"][figure] = round(now - last, 1)
        last = now
        say(f"{line} ({report['seconds'][figure]:.0f} s)")
        if checkpoint is not None:
            checkpoint(report)

    # sizes large enough to reach the device's rate: GiBs past a GPU's caches, a CPU's memory beyond its L3
    if plan.device == "cuda":
        copy_bytes, matmul_n = (2**30, 2048) if plan.quick else (8 * 2**30, 8192)
    else:
        copy_bytes, matmul_n = 2**28, 1024
    bandwidth = measure.copy_bandwidth(device, copy_bytes)
    rate = measure.matrix_rate(device, matmul_n, plan.dtype)
    report["limits"] = {"copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "matrix_tflop_s": round(rate / 1e12, 3),
                        "matrix_dtype": report["dtype"]}  # fmt: skip
    finished("limits", f"device limits: copy {bandwidth / 1e9:.1f} GB/s, matmul {rate / 1e12:.2f} TFLOP/s")

    model = build(plan.shape, device, plan.dtype)
    vocab = vocab_size(model)
    params = measure.parameter_count(model)
    report.update(parameters=params, weight_bytes=measure.weight_bytes(model))
    peered = plan.transformers and ("batch1" in plan.figures or "ttft" in plan.figures)
    hf = transformers_peer(plan.shape, model) if peered else None
    peer_note = NO_PEER.get(plan.shape.family, "skipped (--skip-transformers)" if not plan.transformers else "")
    peer_tok_s = None
    if "batch1" in plan.figures:
        ids = prompt(plan.shape, plan.prompt_tokens, vocab, 1)
        report["batch1"] = []
        _batch1_rows(plan, model, hf, peer_note, ids, bandwidth, report["batch1"], finished)
        peer_tok_s = report["batch1"][-1].get("tok_s")

    def stream_prompt(i: int) -> list[int]:
        return prompt(plan.shape, plan.prompt_tokens, vocab, 100 + i)

    if "ttft" in plan.figures:
        long = prompt(plan.shape, plan.ttft_tokens, vocab, 7)
        limit_ms = 2 * params * plan.ttft_tokens / rate * 1e3  # every weight in a matmul per token, no attention
        alone = measure.ttft(model, long, plan.repeats)
        peer_ms = measure.transformers_first_token_ms(hf, long, plan.repeats) if hf is not None else None
        alone.update(limit_ms=round(limit_ms, 2), vs_limit=_ratio(limit_ms, alone["ms"]), transformers_ms=peer_ms,
                     transformers_note=peer_note, vs_transformers=_ratio(peer_ms, alone["ms"]))  # fmt: skip
        report["ttft"] = alone
    hf = None  # transformers' figures are done: its memory back before the scheduler's
    _release()
    if "ttft" in plan.figures:
        finished("ttft", f"time to first token, {plan.ttft_tokens}-token prompt: {report['ttft']['ms']} ms")
        loaded = measure.ttft_under_load(model, plan.ttft_others, stream_prompt, long)
        loaded.update(limit_ms=round(limit_ms, 2), vs_limit=_ratio(limit_ms, loaded["ttft_ms"]))
        report["ttft_under_load"] = loaded
        finished("ttft_under_load", f"time to first token while {plan.ttft_others} streams decode: "
                 f"{loaded['ttft_ms']} ms")  # fmt: skip

    if "streams" in plan.figures:
        report["streams"] = []
        for count in plan.streams:
            result = measure.streams(model, count, stream_prompt, plan.new_tokens)
            # the step reads every weight once for all rows, until the matmuls reach the matrix rate
            limit = min(count * bandwidth / report["weight_bytes"], rate / (2 * params))
            result.update(limit_tok_s=round(limit, 1), vs_limit=_ratio(result["decode_tok_s"], limit),
                          vs_transformers=_ratio(result["tok_s"], peer_tok_s))  # fmt: skip
            report["streams"].append(result)
            finished(f"streams {count}", f"{count} streams: {result['tok_s']} tok/s, inter-token p50/p99 "
                     f"{result['itl_p50_ms']}/{result['itl_p99_ms']} ms")  # fmt: skip
    if plan.device == "cpu":
        report["rss_high_water_gib"] = measure.rss_high_water_gib()
    report["complete"] = True
    return report


def _batch1_rows(
    plan: Plan,
    model: Any,
    hf: Any | None,
    peer_note: str,
    ids: list[int],
    bandwidth: float,
    rows: list[dict[str, Any]],
    finished: Callable[[str, str], None],
) -> None:
    """glmkit eager, fast, INT8 and INT4 on ``model``'s weights, and transformers' ``hf`` holding them,
    appended to ``rows`` one by one."""
    fast = "compiled" if plan.device == "cuda" else "eager"  # what the engine runs on this device

    def add(row: dict[str, Any], subject: Any, measured: Callable[[], dict[str, Any]]) -> None:
        try:
            row.update(measured())
        except Exception as exc:  # one row failing (a kernel missing on this device) must not cost the run
            row["error"] = first_line(exc)
        row["weight_bytes"] = measure.weight_bytes(subject)
        row["limit_tok_s"] = round(bandwidth / row["weight_bytes"], 1)
        row["vs_limit"] = _ratio(row.get("tok_s"), row["limit_tok_s"])
        rows.append(row)
        finished(f"batch-1 {row['row']}", f"batch-1 {row['row']}: {row.get('tok_s', row.get('error'))} tok/s")

    def glmkit(name: str, subject: Any, mode: str, note: str) -> None:
        def measured() -> dict[str, Any]:
            with measure.decode_mode(mode):
                return measure.batch1(subject, ids, plan.new_tokens, plan.repeats)

        add({"row": name, "mode": mode, "note": note}, subject, measured)

    glmkit("glmkit eager", model, "eager", "the decode step eagerly")
    if plan.device == "cuda":
        glmkit("glmkit fast", model, "compiled", "the compiled CUDA-graph step (GLMKIT_DECODE=compiled)")
    else:
        rows.append({"row": "glmkit fast", "note": "no fast mode on a CPU: the step runs eagerly (the row above)"})
    for bits in (8, 4):
        quantized = quantize_model(copy.deepcopy(model), bits)
        groups = " in groups of 32" if bits == 4 else ""
        glmkit(f"INT{bits}", quantized, fast, f"the same weights, decoder linears INT{bits}{groups}, {fast} step")
        del quantized
        _release()
    if hf is not None:
        note = f"{type(hf).__name__}.generate on the same weights"
        add({"row": "transformers", "note": note}, hf,
            lambda: measure.transformers_generate(hf, ids, plan.new_tokens, plan.repeats))  # fmt: skip
    else:
        rows.append({"row": "transformers", "note": peer_note})
    peer_tok_s, eager_tokens = rows[-1].get("tok_s"), rows[0].get("tokens", [])
    for row in rows:
        row["vs_transformers"] = _ratio(row.get("tok_s"), peer_tok_s)
        if "tokens" in row:
            row["agreement_with_eager"] = measure.agreement(row["tokens"], eager_tokens)
            row["tokens"] = row["tokens"][:32]  # the JSON keeps the first 32
