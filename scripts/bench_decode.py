"""Decode speed of a ChatGLM3-6B- or GLM-4-9B-shaped model (random bf16 weights) on one GPU, in one run.

Measures the device copy bandwidth (the batch-1 limit is that bandwidth over the weights' bytes), batch-1
decode through ``iter_tokens`` with the decode step eager, graphed and compiled+graphed
(``GLMKIT_DECODE``), transformers' ``GlmForCausalLM`` of the same shape and the same weights with
``generate``, 8 and 64 concurrent streams through the scheduler, the time to the first token of a long
prompt, a matmul-only floor (every linear of a step, nothing else, in one CUDA graph) and peak memory.
Prints a table, writes JSON to ``$OUT/bench_decode.json`` (or ``--out``).  ``--tiny`` runs a small
shape on the CPU, so that the script itself is testable without a GPU. ``--shape glm4-9b`` measures
GLM-4-9B's (40 layers, vocabulary 151552, rope_ratio 500: the same network with another config).

    PYTHONPATH=src python scripts/bench_decode.py [--shape glm4-9b] [--tiny] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import statistics
import time
from pathlib import Path

import torch
from percentiles import percentile
from random_chatglm2 import random_chatglm2

from glmkit.engine import Engine, GenerationConfig, iter_tokens
from glmkit.engine.scheduler import Scheduler
from glmkit.models.chatglm2 import ChatGLM2Config

CHATGLM3_6B = {
    "num_layers": 28, "hidden_size": 4096, "ffn_hidden_size": 13696, "num_attention_heads": 32,
    "multi_query_attention": True, "multi_query_group_num": 2, "kv_channels": 128,
    "padded_vocab_size": 65024, "seq_length": 8192, "rope_ratio": 1,
}  # fmt: skip
GLM4_9B = {**CHATGLM3_6B, "num_layers": 40, "padded_vocab_size": 151552, "seq_length": 131072, "rope_ratio": 500}
SHAPES = {"chatglm3-6b": CHATGLM3_6B, "glm4-9b": GLM4_9B}
# the small CPU shape keeps the family's RoPE base
TINY = {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
        "kv_channels": 16, "padded_vocab_size": 512, "seq_length": 2048}  # fmt: skip
GiB = 2**30


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompt(length: int, vocab: int, seed: int) -> list[int]:
    # ChatGLM3's [gMASK] sop in front; with random weights which ids they are does not change the timing
    ids = torch.randint(100, vocab - 100, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [64790 % vocab, 64792 % vocab, *ids[2:]]


def copy_bandwidth(device: torch.device, size: int) -> float:
    """Bytes read plus written per second by a large device-to-device copy (median of 10)."""
    src = torch.randn(size // 2, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * size / statistics.median(times)


def decode_run(model, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, decode tokens/s after it, the tokens) for one greedy request."""
    config = GenerationConfig(do_sample=False, max_new_tokens=new)
    sync()
    start = time.perf_counter()
    tokens, first = [], 0.0
    for token in iter_tokens(model, ids, config):
        if not tokens:
            first = time.perf_counter() - start
        tokens.append(token)
    sync()
    total = time.perf_counter() - start
    return first, (len(tokens) - 1) / (total - first), tokens


def batch1(model, mode: str, ids: list[int], new: int, repeats: int) -> dict:
    os.environ["GLMKIT_DECODE"] = mode
    start = time.perf_counter()
    decode_run(model, ids, new)  # warm-up: compilation, autotuning
    warm = time.perf_counter() - start
    runs = [decode_run(model, ids, new) for _ in range(repeats)]
    return {
        "mode": mode,
        "warmup_s": round(warm, 1),
        "tok_s_runs": [round(r[1], 1) for r in runs],
        "tok_s": round(statistics.median(r[1] for r in runs), 1),
        "tokens": runs[0][2],
    }


class CharTokenizer:
    """Random weights give random ids: any decode will do, as long as it costs what a real one would."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(0x4E00 + i % 20000) for i in ids)


def gaps_ms(stamps: list[float]) -> list[float]:
    return [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]


def streams(model, count: int, prompt_len: int, new: int, vocab: int) -> dict:
    """``count`` requests submitted at once; aggregate tok/s over the wall time, and over the decode phase
    (from the moment every request has its first token); p50/p99 of the gaps between a stream's tokens;
    the KV cache the scheduler fixed at start and the peak memory."""
    engine = Engine(model, CharTokenizer())
    scheduler = Scheduler(engine, max_active=count, max_queue=count)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    config = GenerationConfig(do_sample=False, max_new_tokens=new)
    try:
        for length, budget in ((prompt_len, 8), (prompt_len, new)):  # the first is a warm-up
            inboxes = [queue.Queue() for _ in range(count)]
            sync()
            start = time.perf_counter()
            for i, inbox in enumerate(inboxes):  # items are stamped when the worker delivers them
                scheduler.submit(prompt(length, vocab, 100 + i), config.updated(max_new_tokens=budget),
                                 lambda item, inbox=inbox: inbox.put((time.perf_counter(), item)))  # fmt: skip
            firsts, produced, end, gaps = [], 0, start, []
            for inbox in inboxes:
                stamps = []
                while True:
                    stamp, item = inbox.get(timeout=600)
                    if isinstance(item, BaseException):
                        raise item
                    stamps.append(stamp)
                    produced += len(item.token_ids)
                    if item.finish_reason:
                        break
                firsts.append(stamps[0])
                end = max(end, stamps[-1])
                gaps += gaps_ms(stamps)
            wall = end - start
        budget = scheduler.cache_budget_bytes
    finally:
        scheduler.close()
    all_started = max(firsts) - start
    return {
        "streams": count,
        "tokens": produced,
        "wall_s": round(wall, 3),
        "tok_s": round(produced / wall, 1),
        "decode_tok_s": round((produced - count) / (wall - all_started), 1),
        "last_first_token_s": round(all_started, 3),
        "itl_p50_ms": round(percentile(gaps, 0.5), 2),
        "itl_p99_ms": round(percentile(gaps, 0.99), 2),
        "kv_cache_gib": round(budget / GiB, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if torch.cuda.is_available() else None,
    }


def ttft_under_load(model, others: int, length: int, prompt_len: int, vocab: int, chunk: int) -> dict:
    """A ``length``-token prompt arriving while ``others`` streams decode: its time to first token, and
    the p99 gap between the running streams' tokens in the second before it and while it is prefilled."""
    engine = Engine(model, CharTokenizer())
    scheduler = Scheduler(engine, max_active=others + 1, max_queue=others + 1, prefill_chunk=chunk)
    config = GenerationConfig(do_sample=False, max_new_tokens=2048)  # longer than the measurement
    stamps: list[list[float]] = [[] for _ in range(others)]
    try:
        handles = [
            scheduler.submit(
                prompt(prompt_len, vocab, 200 + i), config, lambda item, i=i: stamps[i].append(time.perf_counter())
            )
            for i in range(others)
        ]
        while min(len(s) for s in stamps) < 20:  # all decoding, graphs captured
            time.sleep(0.05)
        time.sleep(1.0)
        arrived = time.perf_counter()
        inbox: queue.Queue = queue.Queue()
        scheduler.submit(prompt(length, vocab, 300), config.updated(max_new_tokens=4),
                         lambda item: inbox.put(time.perf_counter()))  # fmt: skip
        first = inbox.get(timeout=120)
        time.sleep(0.2)
        for handle in handles:
            handle.cancel()
    finally:
        scheduler.close()
    before = [g for s in stamps for g in gaps_ms([t for t in s if arrived - 1.0 <= t < arrived])]
    during = [g for s in stamps for g in gaps_ms([t for t in s if arrived - 0.05 <= t <= first + 0.05])]
    return {"others": others, "prompt_tokens": length, "prefill_chunk": chunk,
            "ttft_ms": round((first - arrived) * 1e3, 1),
            "others_itl_p99_ms_before": round(percentile(before, 0.99), 2),
            "others_itl_p99_ms_during": round(percentile(during, 0.99), 2) if during else None}  # fmt: skip


def ttft(model, length: int, vocab: int, repeats: int) -> dict:
    ids = prompt(length, vocab, 7)
    decode_run(model, ids, 1)
    times = [decode_run(model, ids, 1)[0] for _ in range(repeats)]
    return {"prompt_tokens": length, "ms_runs": [round(t * 1e3, 1) for t in times],
            "ms": round(statistics.median(times) * 1e3, 1)}  # fmt: skip


def linears_floor(model, rows: int) -> float:
    """Milliseconds of one step's linears alone (every weight read once, batch ``rows``) in one CUDA graph."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, m.in_features, device=m.weight.device, dtype=m.weight.dtype) for m in linears]

    def once():
        for m, x in zip(linears, inputs, strict=True):
            m(x)

    with torch.inference_mode():
        once()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            once()
        graph.replay()
        sync()
        start = time.perf_counter()
        for _ in range(20):
            graph.replay()
        sync()
    return (time.perf_counter() - start) / 20 * 1e3


def step_only(model, rows: int, mode: str, out: Path | None) -> float:
    """Milliseconds of one decode step alone (no sampling, no host sync between steps) for ``rows`` rows
    at position 200 of a 384-position cache; with ``out``, a kernel profile of 5 steps is written there."""
    from glmkit.engine.step import DecodeStep

    cache = model.new_cache(rows, 384)
    step = DecodeStep(model, cache, mode=mode)
    with torch.inference_mode():
        for row in range(rows):
            step.place(row, 1000 + row, 200)
        for _ in range(3):
            step.run(rows)
            step.positions.fill_(200)
        sync()
        start = time.perf_counter()
        for _ in range(50):
            step.run(rows)
            step.positions.fill_(200)
        sync()
        ms = (time.perf_counter() - start) / 50 * 1e3
        if out is not None:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step.run(rows)
                sync()
            out.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    return ms


def step_agreement(model, ids: list[int], modes: list[str]) -> dict:
    """Relative L2 difference of one step's logits between each mode and the first (same cache state)."""
    from glmkit.engine.step import DecodeStep

    logits = {}
    with torch.inference_mode():
        for mode in modes:
            cache = model.new_cache(1, 384)
            model(torch.tensor([ids], device=model.device), cache=cache, last_only=True)
            step = DecodeStep(model, cache, mode=mode)
            step.place(0, 1000, len(ids))
            logits[mode] = step.run(1).float().clone()
    first = logits[modes[0]]
    return {m: float((x - first).norm() / first.norm()) for m, x in logits.items()}


def hf_glm(model, config: dict, device: torch.device):
    """transformers' GlmForCausalLM of the same shape holding the same weight tensors (views, no copy)."""
    from transformers import GlmConfig, GlmForCausalLM

    cfg = GlmConfig(
        vocab_size=config["padded_vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"], num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["multi_query_group_num"],
        head_dim=config["kv_channels"], max_position_embeddings=config["seq_length"], rms_norm_eps=1e-5,
        attention_bias=True, eos_token_id=None, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * config["rope_ratio"],
                         "partial_rotary_factor": 0.5},
    )  # fmt: skip
    with torch.device("meta"):
        hf = GlmForCausalLM(cfg)
    t = model.transformer
    q = config["num_attention_heads"] * config["kv_channels"]
    kv = config["multi_query_group_num"] * config["kv_channels"]
    state = {"model.embed_tokens.weight": t.embedding.word_embeddings.weight, "model.norm.weight":
             t.encoder.final_layernorm.weight, "lm_head.weight": t.output_layer.weight}  # fmt: skip
    for i, layer in enumerate(t.encoder.layers):
        a, p = layer.self_attention, f"model.layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", getattr(a.query_key_value, kind).split([q, kv, kv]), strict=True):
                state[f"{p}self_attn.{name}_proj.{kind}"] = part
        state[p + "self_attn.o_proj.weight"] = a.dense.weight
        state[p + "mlp.gate_up_proj.weight"] = layer.mlp.dense_h_to_4h.weight
        state[p + "mlp.down_proj.weight"] = layer.mlp.dense_4h_to_h.weight
        state[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        state[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
    hf.load_state_dict(state, strict=True, assign=True)
    with torch.device(device):  # its inv_freq buffer, made again (a meta tensor so far)
        hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg)
    return hf.eval()


def transformers_generate(hf, ids: list[int], new: int, device: torch.device) -> dict:
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        sync()
        start = time.perf_counter()
        out = hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync()
    seconds = time.perf_counter() - start
    return {"tok_s": round(new / seconds, 1), "seconds": round(seconds, 2), "tokens": out[0, len(ids) :].tolist(),
            "weights": "the same tensors as glmkit's model"}  # fmt: skip


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def table(report: dict) -> str:
    limit = report.get("batch1_limit_tok_s")
    hf = report.get("transformers", {}).get("tok_s")
    lines = ["| figure | value | / limit | / transformers |", "|---|---:|---:|---:|"]

    def row(name, value, unit="tok/s", ratio=True):
        r_limit = f"{value / limit:.2f}" if ratio and limit else ""
        r_hf = f"{value / hf:.1f}x" if ratio and hf else ""
        lines.append(f"| {name} | {value} {unit} | {r_limit} | {r_hf} |")

    if limit:
        row("copy bandwidth", round(report["copy_bandwidth_tb_s"], 2), "TB/s", ratio=False)
        row("batch-1 limit (bandwidth / weight bytes)", round(limit, 1))
    for mode, result in report.get("batch1", {}).items():
        row(f"batch-1 decode, glmkit {mode}", result["tok_s"])
    if hf:
        row("batch-1 decode, transformers generate", hf)
    for result in report.get("streams", []):
        row(f"{result['streams']} streams, scheduler, wall", result["tok_s"])
        row(f"{result['streams']} streams, scheduler, decode phase", result["decode_tok_s"])
        row(f"{result['streams']} streams, inter-token p50 / p99",
            f"{result['itl_p50_ms']} / {result['itl_p99_ms']}", "ms", False)  # fmt: skip
        if result.get("peak_gib"):
            row(f"{result['streams']} streams, KV cache fixed at start / peak memory",
                f"{result['kv_cache_gib']} / {result['peak_gib']}", "GiB", False)  # fmt: skip
    if "ttft" in report:
        row(f"time to first token, {report['ttft']['prompt_tokens']}-token prompt", report["ttft"]["ms"], "ms", False)
    for result in report.get("ttft_under_load", []):
        name = (f"{result['prompt_tokens']}-token prompt while {result['others']} streams decode "
                f"(chunk {result['prefill_chunk']})")  # fmt: skip
        row(f"time to first token, {name}", result["ttft_ms"], "ms", False)
        row(f"their inter-token p99 before / during, {name}",
            f"{result['others_itl_p99_ms_before']} / {result['others_itl_p99_ms_during']}", "ms", False)  # fmt: skip
    for name, ms in report.get("step_only_ms", {}).items():
        row(f"decode step alone, {name} (graph replay)", round(ms, 2), "ms", False)
    for rows, ms in report.get("linears_floor_ms", {}).items():
        row(f"linears alone, batch {rows} (graph)", round(ms, 2), "ms", False)
    if "peak_gib" in report:
        row("peak memory", report["peak_gib"], "GiB", False)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="chatglm3-6b", help="the model's sizes")
    parser.add_argument("--tiny", action="store_true", help="a small shape on the CPU")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--modes", default="eager,graphs,compiled")
    parser.add_argument("--streams", default="1,8,32,64,256")
    parser.add_argument("--prefill-chunks", default="2048,512", help="chunks of the TTFT-under-load runs ('': none)")
    parser.add_argument("--step-modes", default="graphs,compiled", help="modes of the step-alone timings ('': none)")
    parser.add_argument("--skip-floor", action="store_true", help="skip the linears-only floor")
    parser.add_argument("--out", type=Path, help="default: $OUT/bench_decode.json (bench_decode_SHAPE.json)")
    args = parser.parse_args()
    name = "bench_decode.json" if args.shape == "chatglm3-6b" else f"bench_decode_{args.shape}.json"
    args.out = args.out or Path(os.environ.get("OUT", ".")) / name
    device = torch.device("cpu" if args.tiny else "cuda")
    config = {**SHAPES[args.shape], **(TINY if args.tiny else {})}
    prompt_len, new, repeats = (16, 16, 1) if args.tiny else (128, 256, 3)
    vocab = config["padded_vocab_size"]
    report: dict = {"torch": torch.__version__, "device": str(device), "shape": args.shape, "config": config,
                    "prompt_tokens": prompt_len, "new_tokens": new}  # fmt: skip
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
        torch.cuda.reset_peak_memory_stats()

    def save(section: str) -> None:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"[{time.strftime('%H:%M:%S')}] {section} done", flush=True)

    model = random_chatglm2(ChatGLM2Config.from_dict(config), device, torch.float32 if args.tiny else torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report["weight_gb"] = round(weight_bytes / 1e9, 3)
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device, 8 * 2**30)
        report["copy_bandwidth_tb_s"] = bandwidth / 1e12
        report["batch1_limit_tok_s"] = bandwidth / weight_bytes
        if not args.skip_floor:
            report["linears_floor_ms"] = {rows: linears_floor(model, rows) for rows in (1, 8, 64)}
        save("bandwidth")
    ids = prompt(prompt_len, vocab, 1)
    report["batch1"] = {}
    for mode in args.modes.split(","):
        if device.type != "cuda" and mode == "graphs":
            continue
        report["batch1"][mode] = batch1(model, mode, ids, new, repeats)
        save(f"batch-1 {mode}")
    os.environ["GLMKIT_DECODE"] = "compiled" if device.type == "cuda" else "eager"
    reference = next(iter(report["batch1"].values()))["tokens"]
    if device.type == "cuda":
        report["step_logits_rel_diff"] = step_agreement(model, ids, ["eager", "graphs", "compiled"])
        modes = [m for m in args.step_modes.split(",") if m]
        report["step_only_ms"] = {f"{m} x{rows}": step_only(model, rows, m, None) for m in modes for rows in (1, 8, 64)}
        if "compiled" in modes:
            step_only(model, 1, "compiled", args.out.with_name("profile_step_b1.txt"))
            step_only(model, 64, "compiled", args.out.with_name("profile_step_b64.txt"))
        save("step only")
    report["greedy_agreement_with_first_mode"] = {m: agreement(r["tokens"], reference)
                                                  for m, r in report["batch1"].items()}  # fmt: skip
    if not args.skip_transformers:
        hf = hf_glm(model, config, device)
        report["transformers"] = transformers_generate(hf, ids, new, device)
        report["transformers"]["greedy_agreement_with_glmkit"] = agreement(report["transformers"]["tokens"], reference)
        del hf
        save("transformers")
    report["streams"] = []
    for count in (int(c) for c in args.streams.split(",")):
        report["streams"].append(streams(model, count, prompt_len, new, vocab))
        save(f"{count} streams")
    report["ttft"] = ttft(model, 64 if args.tiny else 1024, vocab, repeats)
    others, long = (3, 64) if args.tiny else (63, 1024)
    report["ttft_under_load"] = [ttft_under_load(model, others, long, prompt_len, vocab, int(chunk))
                                 for chunk in args.prefill_chunks.split(",") if chunk]  # fmt: skip
    if device.type == "cuda":
        report["peak_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
    save("ttft")
    for result in report["batch1"].values():
        result["tokens"] = result["tokens"][:32]
    report.get("transformers", {}).pop("tokens", None)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(report))


if __name__ == "__main__":
    main()
