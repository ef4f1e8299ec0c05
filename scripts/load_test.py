"""Load test for ``glmkit serve``: requests/s, tokens/s and latency at several client counts.

Bounded on purpose: loopback servers only, at most ``--rounds`` requests per client, no new request
after ``--time-limit`` seconds per level.  Either point it at a running server (``--url``) or let it
start ``glmkit serve`` on the demo model (CPU) itself::

    .venv/bin/python scripts/load_test.py                        # starts its own server
    .venv/bin/python scripts/load_test.py --url http://127.0.0.1:8000 --concurrency 1 8 32

Each request streams an OpenAI chat completion (greedy, ``--max-tokens`` tokens at most); latency is
the whole request, "first token" the wait for the first content delta, tokens are the server's
``usage.completion_tokens``.  Percentiles are nearest-rank.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from glmkit.bench.stats import percentile

PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write a haiku about the sea.",
    "Explain what a CPU does in two sentences.",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "List four animals that live in the ocean.",
    "What is 12 times 7?",
]
MAX_CONCURRENCY = 128
MAX_ROUNDS = 50


@dataclass
class Result:
    latency: float
    first_token: float | None
    tokens: int
    error: str | None = None


def _loopback(url: str) -> bool:
    """Only literal loopback addresses and localhost: no name lookups that could lead elsewhere."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth() -> dict[str, str]:
    key = os.environ.get("GLMKIT_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def _one(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Result:
    request = {
        "model": "load-test",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, tokens = None, 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            if response.status_code != 200:
                await response.aread()
                return Result(time.perf_counter() - started, None, 0, f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    return Result(time.perf_counter() - started, first, tokens, event["error"]["message"])
                if first is None and any(c["delta"].get("content") for c in event["choices"]):
                    first = time.perf_counter() - started
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return Result(time.perf_counter() - started, first, tokens, f"{type(exc).__name__}: {exc}")
    return Result(time.perf_counter() - started, first, tokens)


async def _warm_up(url: str) -> None:
    """One request first, so the first level does not pay for lazy initialisation."""
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=_auth()) as client:
        await _one(client, PROMPTS[0], 4)


async def _level(url: str, clients: int, rounds: int, max_tokens: int, time_limit: float) -> dict[str, float]:
    deadline = time.perf_counter() + time_limit
    results: list[Result] = []

    async def worker(index: int, client: httpx.AsyncClient) -> None:
        for round_ in range(rounds):
            if time.perf_counter() > deadline:
                return
            prompt = PROMPTS[(index + round_) % len(PROMPTS)]
            results.append(await _one(client, prompt, max_tokens))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(time_limit + 300)  # a request started before the deadline may finish after it
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout, headers=_auth()) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(i, client) for i in range(clients)))
        wall = time.perf_counter() - started
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    if errors:
        print(f"  {len(errors)} failed, e.g.: {errors[0]}", file=sys.stderr)
    firsts = [r.first_token for r in ok if r.first_token is not None]
    latencies = [r.latency for r in ok]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "rps": len(ok) / wall,
        "tps": sum(r.tokens for r in ok) / wall,
        "p50": percentile(latencies, 0.5) if ok else math.nan,
        "p99": percentile(latencies, 0.99) if ok else math.nan,
        "ttft": percentile(firsts, 0.5) if firsts else math.nan,
    }


def _start_server(max_active: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "glmkit", "serve", "--device", "cpu", "--port", str(port)]
    command += ["--max-active", str(max_active), "--max-queue", str(max(64, max_active))]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"could not start the server: {' '.join(command)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server on this machine; default: start one on the demo model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="client counts to test")
    parser.add_argument("--rounds", type=int, default=4, help=f"requests per client and level (<= {MAX_ROUNDS})")
    parser.add_argument("--max-tokens", type=int, default=32, help="most tokens per reply")
    parser.add_argument("--time-limit", type=float, default=180, help="seconds per level before no new request")
    args = parser.parse_args()
    if not 1 <= args.rounds <= MAX_ROUNDS or not all(1 <= c <= MAX_CONCURRENCY for c in args.concurrency):
        parser.error(f"--rounds must be 1..{MAX_ROUNDS} and each --concurrency 1..{MAX_CONCURRENCY}")
    if args.url and not _loopback(args.url):
        parser.error(f"{args.url} is not a loopback address: this script only loads servers on this machine")

    process = None
    url = args.url
    if url is None:
        process, url = _start_server(max(args.concurrency))
    try:
        model = httpx.get(f"{url}/v1/models", headers=_auth(), timeout=30).json()["data"][0]["id"]
        print(
            f"{model} at {url}; {os.cpu_count()} CPUs; max_tokens {args.max_tokens}, {args.rounds} requests per client"
        )
        asyncio.run(_warm_up(url))
        columns = ["clients", "requests", "errors", "requests/s", "tokens/s", "p50 latency (s)", "p99 latency (s)"]
        columns.append("p50 first token (s)")
        print("| " + " | ".join(columns) + " |")
        print("|" + "---:|" * len(columns))
        for clients in args.concurrency:
            row = asyncio.run(_level(url, clients, args.rounds, args.max_tokens, args.time_limit))
            print(
                f"| {row['clients']} | {row['requests']} | {row['errors']} | {row['rps']:.2f} | {row['tps']:.1f} "
                f"| {row['p50']:.2f} | {row['p99']:.2f} | {row['ttft']:.2f} |",
                flush=True,
            )
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
