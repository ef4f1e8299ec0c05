"""A 1,024-token prompt arriving while 63 streams decode, per ``--prefill-chunk``: its time to the first
token and the p99 gap between the other streams' tokens before it arrives and while it is prefilled.
One process, so the step is compiled once for all chunk sizes; ChatGLM3-6B shape, random bf16 weights.

    PYTHONPATH=src python3 scripts/bench_prefill_chunk.py --chunks 2048,512,256
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from glmkit.bench import measure
from glmkit.bench.shapes import SHAPES, build, prompt, vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="2048,512,256", help="prefill chunk sizes, comma list")
    parser.add_argument("--others", type=int, default=63, help="streams decoding when the prompt arrives")
    parser.add_argument("--out", type=Path, help="default: $OUT/prefill_chunk.json")
    args = parser.parse_args()
    shape = SHAPES["chatglm3-6b"]
    model = build(shape, torch.device("cuda"), torch.bfloat16)
    vocab = vocab_size(model)
    newcomer = prompt(shape, 1024, vocab, 7)
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        row = measure.ttft_under_load(model, args.others, lambda i: prompt(shape, 128, vocab, 100 + i), newcomer, chunk)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| prefill chunk | TTFT ms | others' p99 before ms | while prefilled ms | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["others_itl_p99_ms_during"] / r["others_itl_p99_ms_before"]
        print(f"| {r['chunk']} | {r['ttft_ms']} | {r['others_itl_p99_ms_before']} | "
              f"{r['others_itl_p99_ms_during']} | {ratio:.2f} |")  # fmt: skip
    out = args.out or Path(os.environ.get("OUT", ".")) / "prefill_chunk.json"
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
