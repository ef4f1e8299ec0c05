"""Weight-only quantized linears, drop-in for ``nn.Linear`` in the decoder blocks of every family.

* ``Int8Linear``: symmetric INT8 per output channel, ``weight`` int8 ``[out, in]`` and ``weight_scale``
  ``[out]`` -- the names and the meaning of the official ChatGLM INT8 checkpoints, which load as they are.
  CPU: ``torch._weight_int8pack_mm``.  CUDA: glmkit's Triton kernels (``int8_kernels.py``; the aten CUDA
  kernel of 2.11 is a naive loop, see scripts/bench_quantize.py).
* ``Int4Linear``: asymmetric INT4 in groups of ``group_size`` inputs (tinygemm's format: a value is
  ``(q - 8) * scale + zero``, ``q`` in 0..15).  Stored as ``weight`` uint8 ``[out, in/2]`` (element ``2j`` in
  the high nibble, ``2j+1`` in the low one, as the official ChatGLM INT4 files and
  ``_convert_weight_to_int4pack`` on torch >= 2.5 read it) and ``scales_and_zeros`` ``[in/group, out, 2]``.
  ``pack()`` turns ``weight`` into the kernel layout of its device: ``_weight_int4pack_mm`` on CUDA (sm80+,
  bf16 activations; needs out % 8 and in % 32), ``_weight_int4pack_mm_for_cpu`` on CPU (out % 16); other
  shapes are padded, other devices dequantize and matmul.  ``in`` is padded to whole groups.

The state dict always holds the device-independent layout above, whatever the module is packed for.
Gradients flow to the input (the weights are buffers, frozen), for adapters on a quantized base.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from glmkit.errors import GlmkitError

GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # measured: lower error than 64/128 on every model tried (docs/quantization.md)
CONFIG_KEY = "quantization"  # the section glmkit writes into config.json of a quantized checkpoint


@dataclass(frozen=True)
class QuantizationSpec:
    """How a model's decoder linears are quantized.  ``official``: ChatGLM's ``quantization.py`` files
    (``quantization_bit`` in config.json; INT4 two per byte with one scale per row)."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    official: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise GlmkitError(f"quantize to 4 or 8 bits, not {self.bits}")
        if self.bits == 4 and not self.official and self.group_size not in GROUP_SIZES:
            raise GlmkitError(f"INT4 group size must be one of {GROUP_SIZES}, not {self.group_size}")

    def to_config(self) -> dict[str, Any]:
        section: dict[str, Any] = {"method": "glmkit-weight-only", "bits": self.bits}
        if self.bits == 4:
            section["group_size"] = self.group_size
        return section

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationSpec | None:
        """The quantization a checkpoint's config.json declares; None for a float checkpoint."""
        section = config.get(CONFIG_KEY)
        if isinstance(section, dict) and section.get("method") == "glmkit-weight-only":
            return cls(int(section["bits"]), int(section.get("group_size", DEFAULT_GROUP_SIZE)))
        bits = config.get("quantization_bit") or 0
        if not bits:
            return None
        if bits not in (4, 8):
            raise GlmkitError(f"quantization_bit={bits} is not a ChatGLM format (4 or 8)")
        if config.get("quantization_embeddings"):
            raise GlmkitError("checkpoints with quantized embeddings (quantization_embeddings) are not supported")
        return cls(bits, official=True)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _wants_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class Int8Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, w.device, w.dtype)
        q, scale = quantize_int8(w)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without the bias, through the device's kernel (not differentiable)."""
        scale = self.weight_scale.to(x.dtype)
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(_rows_2d(x), self.weight, scale).view(*x.shape[:-1], -1)
        if x.device.type == "cuda":
            from glmkit.models.int8_kernels import MAX_KERNEL_ROWS, int8_matmul  # Triton: imported on CUDA only

            rows = _rows_2d(x)
            if rows.shape[0] <= MAX_KERNEL_ROWS:  # more rows (a prefill): compute-bound, cuBLAS below
                return int8_matmul(rows, self.weight, scale).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = quantized_matmul(self, x)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


class Int4Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = DEFAULT_GROUP_SIZE,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = _round_up(in_features, group_size)
        self.register_buffer("weight", torch.empty(out_features, self.padded_in // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales_and_zeros", torch.empty(self.padded_in // group_size, out_features, 2, dtype=dtype, device=device)
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None
        self.layout = "plain"  # or "cpu" / "cuda": ``weight`` holds that kernel's layout (rows padded)
        self.inner_k_tiles = 8

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.device, w.dtype)
        plain, scales_and_zeros = quantize_int4(w, group_size, w.dtype)
        module.weight.copy_(plain)
        module.scales_and_zeros.copy_(scales_and_zeros)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    # -- layouts ------------------------------------------------------------------------------------------
    def _kernel_layout(self) -> str:
        device = self.weight.device
        if device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "cpu"
        if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0):
            return "cuda"  # the tinygemm kernel is written for NVIDIA tensor cores of sm80 and later
        return "plain"

    def pack(self) -> None:
        """Put ``weight`` into the layout of its device's kernel (a no-op where there is none)."""
        layout = self._kernel_layout()
        if layout == self.layout or layout == "plain":
            return
        rows = _round_up(self.out_features, 16 if layout == "cpu" else 8)
        plain = F.pad(self.weight, (0, 0, 0, rows - self.out_features))
        if layout == "cpu":
            nibbles = torch.stack([plain >> 4, plain & 0xF], dim=-1).flatten(1).to(torch.int32)
            packed = torch._convert_weight_to_int4pack_for_cpu(nibbles, self.inner_k_tiles)
        else:
            # inner k-tiles of 16: the largest of 8/4/2 that divides the (group-padded) input
            self.inner_k_tiles = next(t for t in (8, 4, 2) if self.padded_in % (16 * t) == 0)
            packed = torch._convert_weight_to_int4pack(plain.contiguous(), self.inner_k_tiles)
        self.weight, self.layout = packed, layout
        if rows != self.out_features:
            self.scales_and_zeros = F.pad(self.scales_and_zeros, (0, 0, 0, rows - self.out_features))

    def plain_weight(self) -> torch.Tensor:
        """``weight`` in the device-independent layout, whatever the module is packed for."""
        if self.layout == "plain":
            return self.weight
        if self.layout == "cuda":
            plain = unpack_cuda_int4(self.weight, self.inner_k_tiles)
        else:
            plain = _unpack_through_kernel(self.weight, self.padded_in, self.group_size)
        return plain[: self.out_features]

    def unpack(self) -> None:
        if self.layout != "plain":
            self.weight = self.plain_weight().contiguous()
            self.scales_and_zeros = self.scales_and_zeros[:, : self.out_features].contiguous()
            self.layout = "plain"

    def _apply(self, fn, recurse=True):
        # moving between devices changes the kernel: go through the plain layout and pack again
        packed = self.layout != "plain"
        self.unpack()
        super()._apply(fn, recurse)
        if packed and self.weight.device.type != "meta":
            self.pack()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.plain_weight()
        destination[prefix + "scales_and_zeros"] = self.scales_and_zeros[:, : self.out_features]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        packed = self.layout != "plain"
        self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if packed:
            self.pack()

    # -- compute ------------------------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight ``[out, in]`` the quantized values stand for."""
        sz = self.scales_and_zeros[:, : self.out_features].float()
        return dequantize_int4(self.plain_weight(), sz, self.group_size)[:, : self.in_features].to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without the bias, through the device's kernel (not differentiable)."""
        if self.layout == "plain":
            return F.linear(x, self.dequantize(x.dtype))
        rows = _rows_2d(x)
        if self.padded_in != self.in_features:
            rows = F.pad(rows, (0, self.padded_in - self.in_features))
        if self.layout == "cuda":  # the kernel computes in bf16 only
            out = torch._weight_int4pack_mm(
                rows.to(torch.bfloat16), self.weight, self.group_size, self.scales_and_zeros.to(torch.bfloat16)
            ).to(x.dtype)
        else:
            scales_and_zeros = self.scales_and_zeros.to(x.dtype)
            out = torch._weight_int4pack_mm_for_cpu(rows, self.weight, self.group_size, scales_and_zeros)
        return out[:, : self.out_features].reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = quantized_matmul(self, x)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
            f"group_size={self.group_size}, layout={self.layout}"
        )


QuantizedLinear = (Int8Linear, Int4Linear)


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` for a frozen quantized ``W``, differentiable in ``x`` only.  The forward runs the
    module's kernel; the backward dequantizes ``W`` again for ``grad @ W``.  Plain autograd through a
    dequantized weight would keep that float copy of every linear from forward to backward: the memory
    a quantized base is meant to save when adapters train over it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: Int8Linear | Int4Linear) -> torch.Tensor:
        ctx.module = module
        return module.matmul(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.module.dequantize(grad.dtype), None


def is_quantized(network: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in network.modules())


def quantized_matmul(module: Int8Linear | Int4Linear, x: torch.Tensor) -> torch.Tensor:
    return _FrozenQuantizedMatmul.apply(x, module) if _wants_grad(x) else module.matmul(x)


# ---- the arithmetic ----------------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[out, in]`` and per-row scales (``absmax / 127``, in ``w``'s dtype), as the official code."""
    scale = (w.float().abs().amax(dim=1) / 127).clamp(min=1e-10).to(w.dtype)
    q = torch.round(w.float() / scale.float()[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-layout uint8 ``[out, padded_in/2]`` and ``scales_and_zeros`` ``[groups, out, 2]`` in ``dtype``.

    Each group maps its [min, max] onto 0..15.  Scale and zero are rounded to ``dtype`` first and the
    values quantized against the rounded ones, so the dequantized weight is as close as storage allows.
    """
    out_features, in_features = w.shape
    padded = F.pad(w.float(), (0, _round_up(in_features, group_size) - in_features))
    groups = padded.view(out_features, -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-6).to(dtype).float()
    zero = (low + 8 * scale).to(dtype).float()
    q = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).to(torch.uint8)
    q = q.view(out_features, -1)
    plain = (q[:, 0::2] << 4) | q[:, 1::2]
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return plain, scales_and_zeros


def dequantize_int4(plain: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Float32 ``[out, padded_in]`` from the plain layout."""
    q = torch.stack([plain >> 4, plain & 0xF], dim=-1).flatten(1).float()
    scale = scales_and_zeros[..., 0].t().repeat_interleave(group_size, dim=1)
    zero = scales_and_zeros[..., 1].t().repeat_interleave(group_size, dim=1)
    return (q - 8) * scale + zero


def unpack_cuda_int4(packed: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Invert ``_convert_weight_to_int4pack`` (NVIDIA layout of aten/src/ATen/native/cuda/int4mm.cu).

    ``packed`` is int32 ``[n/8, k/(16*tiles), 32, tiles/2]``: lane ``t`` of a tile holds row ``t // 4``;
    its word ``j`` holds bytes ``16j + 4i + t % 4`` (i = 0..3) of that row's stretch of ``8 * tiles`` bytes,
    the high nibble of byte ``i`` in bits ``4i..4i+3`` and the low one in bits ``16+4i..19+4i``.
    """
    n_tiles, k_outer = packed.shape[:2]
    shifts = torch.arange(4, device=packed.device, dtype=torch.int32) * 4
    words = packed[..., None]  # [..., j, i]
    high, low = (words >> shifts) & 0xF, (words >> (shifts + 16)) & 0xF
    data = ((high << 4) | low).to(torch.uint8)  # [n_tiles, k_outer, 32, tiles/2, 4]
    data = data.view(n_tiles, k_outer, 8, 4, inner_k_tiles // 2, 4)  # t -> (row, t % 4)
    return data.permute(0, 2, 1, 4, 5, 3).reshape(n_tiles * 8, k_outer * inner_k_tiles * 8)


def _unpack_through_kernel(packed: torch.Tensor, padded_in: int, group_size: int) -> torch.Tensor:
    """The plain layout of a CPU-packed weight, read back through the kernel itself (its layout depends on
    the CPU's vector width): multiplying identity rows with scale 1 and zero 0 gives ``q - 8`` exactly."""
    rows = packed.shape[0]
    unit = torch.zeros(padded_in // group_size, rows, 2)
    unit[..., 0] = 1
    q = torch.empty(rows, padded_in, dtype=torch.uint8)
    for start in range(0, padded_in, 1024):
        count = min(1024, padded_in - start)
        eye = torch.zeros(count, padded_in)
        eye[torch.arange(count), torch.arange(start, start + count)] = 1
        q[:, start : start + count] = (torch._weight_int4pack_mm_for_cpu(eye, packed, group_size, unit) + 8).t()
    return (q[:, 0::2] << 4) | q[:, 1::2]


# ---- official ChatGLM files ---------------------------------------------------------------------------------


def official_int4_to_plain(
    packed: torch.Tensor, weight_scale: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM's INT4 (signed nibbles, element 2j high, ``w = q * weight_scale[row]``) as an ``Int4Linear``
    state: ``q + 8`` is the nibble with its sign bit flipped, and every group of a row gets the row's scale
    with zero 0 -- the same values, exactly."""
    plain = packed.view(torch.uint8) ^ 0x88
    groups = plain.shape[1] * 2 // group_size
    scales_and_zeros = torch.zeros(groups, plain.shape[0], 2, dtype=weight_scale.dtype)
    scales_and_zeros[..., 0] = weight_scale
    return plain, scales_and_zeros


def official_group_size(in_features: int) -> int:
    """The group for an official INT4 linear: any works (one scale per row); the largest that divides."""
    for size in sorted(GROUP_SIZES, reverse=True):
        if in_features % size == 0:
            return size
    raise GlmkitError(f"an official INT4 linear with {in_features} inputs is not a multiple of 32")


def translate_official_int4(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors with each ``X.weight`` (int8, two per byte) + ``X.weight_scale`` pair turned into
    ``X.weight`` (plain uint8) + ``X.scales_and_zeros``; everything else passes through."""
    pending: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        prefix, _, leaf = name.rpartition(".")
        is_packed = leaf == "weight" and tensor.dtype == torch.int8
        if not (is_packed or leaf == "weight_scale"):
            yield name, tensor
            continue
        other = f"{prefix}.weight_scale" if is_packed else f"{prefix}.weight"
        if other not in pending:
            pending[name] = tensor
            continue
        packed, scale = (tensor, pending.pop(other)) if is_packed else (pending.pop(other), tensor)
        plain, scales_and_zeros = official_int4_to_plain(packed, scale, official_group_size(packed.shape[1] * 2))
        yield f"{prefix}.weight", plain
        yield f"{prefix}.scales_and_zeros", scales_and_zeros
    if pending:
        raise GlmkitError(f"INT4 tensors without their pair (weight / weight_scale): {sorted(pending)[:5]}")


# ---- whole models ------------------------------------------------------------------------------------------


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise GlmkitError(f"{type(model).__name__} has no decoder blocks glmkit knows how to quantize")
    return blocks


def _linears(block: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [
        (parent, name, child)
        for parent in block.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def empty_quantized(linear: nn.Linear, spec: QuantizationSpec) -> nn.Module:
    """An uninitialised quantized module shaped for ``linear`` (for loading a quantized checkpoint)."""
    w = linear.weight
    bias = linear.bias is not None
    if spec.bits == 8:
        return Int8Linear(linear.in_features, linear.out_features, bias, w.device, w.dtype)
    group_size = official_group_size(linear.in_features) if spec.official else spec.group_size
    return Int4Linear(linear.in_features, linear.out_features, bias, group_size, w.device, w.dtype)


def replace_linears(model: nn.Module, spec: QuantizationSpec) -> None:
    """Swap every decoder linear for an empty quantized module of the same shape (weights to be loaded)."""
    for block in decoder_blocks(model):
        for parent, name, linear in _linears(block):
            setattr(parent, name, empty_quantized(linear, spec))


def pack_model(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.pack()


def unpack_model(model: nn.Module) -> None:
    """INT4 weights back in the plain layout, for training over them: a weight that needs a gradient
    path is dequantized in the forward and again in the backward, which the plain layout does with
    pointwise ops that compile (the CPU kernel's layout unpacks only through the kernel)."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.unpack()


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    devices: list[torch.device] | None = None,
    pack: bool = True,
) -> nn.Module:
    """Replace the linears of every decoder block by quantized ones, in place, one block at a time.

    With ``devices``, each block is quantized on, and left on, its device as ``spread_layers`` places it
    (everything outside the blocks goes to ``devices[0]``): the float model may sit on the CPU and never
    be whole on a GPU.  ``pack=False`` leaves INT4 weights in the plain layout (for writing them out).
    Embeddings and the output head stay in floating point (tied to the embeddings in some families, and
    the head's error lands directly on the logits).
    """
    from glmkit.models.loading import spread_layers

    spec = QuantizationSpec(bits, group_size)
    blocks = decoder_blocks(model)
    placement = spread_layers(len(blocks), devices) if devices else [None] * len(blocks)
    for block, target in zip(blocks, placement, strict=True):
        for parent, name, linear in _linears(block):
            if target is not None:
                linear.to(target)
            if spec.bits == 8:
                setattr(parent, name, Int8Linear.from_linear(linear))
            else:
                setattr(parent, name, Int4Linear.from_linear(linear, spec.group_size))
        if target is not None:
            block.to(target)
        if pack:
            pack_model(block)
    if devices:
        in_blocks = {id(m) for block in blocks for m in block.modules()}
        for module in model.modules():
            if id(module) not in in_blocks:
                module._apply(lambda t: t.to(devices[0]), recurse=False)
    return model
