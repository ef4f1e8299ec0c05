"""Triton kernels for ``x @ W.T`` with a weight-only INT8 ``W`` on CUDA, in ``Int8Linear``'s layout (int8
``[N, K]``, one scale per output row; ``models/quantize.py``), so nothing is repacked.

Written here because PyTorch has no good kernel for it at decode sizes: ``_weight_int8pack_mm`` on CUDA
is a plain loop, and casting the weight for a bf16 matmul read it at about 300 GB/s on an H200 (as the
compiled step did unless inductor's coordinate-descent tuning rewrote it, for one row only).  A decode
step is a few rows against every weight, so both kernels stream the int8 weight once and convert it in
registers:

* one row: a matrix-vector product on the CUDA cores (``_int8_gemv``);
* up to ``MAX_KERNEL_ROWS`` rows (the scheduler's steps): tiles on the tensor cores (``_int8_mm``);
* more rows (a prefill, compute-bound): ``Int8Linear`` casts the weight whole for cuBLAS instead.

The kernels are a ``torch.library`` op, so ``torch.compile`` keeps them whole inside a compiled step and
CUDA graphs replay them.  Block sizes are autotuned once per weight shape on the first call, which is
outside graph capture (``DecodeStep`` warms up before it captures).  INT4 stays on PyTorch's tinygemm:
a Triton INT4 kernel of the same design measured slower (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_KERNEL_ROWS = 256


def _gemv_configs(sizes: list[tuple[int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=2) for n, k in sizes for w in (4, 8)]


def _mm_configs(sizes: list[tuple[int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=4, num_stages=s) for n, k in sizes for s in (3, 4)]


def _block_m(rows: int) -> int:
    return min(64, max(16, triton.next_power_of_2(rows)))


# ---- INT8, one scale per output row ------------------------------------------------------------------------


@triton.autotune(configs=_gemv_configs([(8, 512), (16, 256), (16, 512), (32, 256), (16, 1024)]), key=["N", "K"])
@triton.jit
def _int8_gemv(x_ptr, w_ptr, scale_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # the int8 weights are read four to a 32-bit word and turned into floats with integer operations:
    # a byte b put into the low mantissa bits of 2**23 gives the float 2**23 + b exactly.  The conversion
    # instruction (I2F) runs at an eighth of the FMA rate and bounded this kernel at 2.7 TB/s on an H200
    WORDS: tl.constexpr = BLOCK_K // 4
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, WORDS)
    n_ok = rn < N
    words = w_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
    for start in range(0, K // 4, WORDS):
        j = start + rw
        j_ok = j < K // 4
        word = tl.load(words + rn[:, None] * (K // 4) + j[None, :], mask=n_ok[:, None] & j_ok[None, :], other=0)
        for i in tl.static_range(4):
            x = tl.load(x_ptr + 4 * j + i, mask=j_ok, other=0.0).to(tl.float32)
            offset = ((word >> (8 * i)) & 0xFF) ^ 0x80  # the signed byte plus 128
            value = (offset | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # 2**23 + 128
            acc += value * x[None, :]
    scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, (tl.sum(acc, axis=1) * scale).to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.autotune(configs=_mm_configs([(32, 64), (64, 64), (64, 128), (128, 64), (128, 128)]), key=["BLOCK_M", "N", "K"])
@triton.jit
def _int8_mm(
    x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + rk
        x = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * K + k[:, None], mask=(rn[None, :] < N) & (k[:, None] < K), other=0)
        acc = tl.dot(x, w.to(x.dtype), acc)
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    out = (acc * scale[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], out, mask=(rm[:, None] < M) & (rn[None, :] < N))


# ---- the ops --------------------------------------------------------------------------------------------------


@torch.library.custom_op("glmkit::int8_matmul", mutates_args=(), device_types="cuda")
def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ (weight [N, K] int8 * scale [N]).T`` in ``x``'s dtype, for M up to ``MAX_KERNEL_ROWS``."""
    x, weight = x.contiguous(), weight.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 1 and k % 4 == 0 and weight.data_ptr() % 4 == 0:  # rows of whole, aligned 32-bit words
        _int8_gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, weight, scale, out, n, k)
    else:
        block_m = _block_m(m)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))  # noqa: E731
        _int8_mm[grid](x, weight, scale, out, m, n, k, BLOCK_M=block_m)
    return out


@int8_matmul.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])
