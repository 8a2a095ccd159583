"""NF4: QLoRA's 4-bit normal-float format, as bitsandbytes stores it.

The weight [out, in] is read as one flat row-major array cut into blocks of 64 values; each block
keeps its absolute maximum (float32) and each value the index of the nearest of 16 code values in
[-1, 1] (the quantiles of a normal distribution, exact zero included) after division by that
maximum. Two indices share a byte, the first in the high four bits. Any shape takes it (a last block
that is not full is padded with zeros, which changes neither its maximum nor the other values).
Memory: 0.5 byte + 4 / 64 bytes per weight, 0.28x of bfloat16.

Products:
- CUDA with bitsandbytes installed (`pip install petals_like[cuda]`): its fused 4-bit kernels
  (`bnb.matmul_4bit`), the weight quantized by bitsandbytes itself.
- CPU, up to FUSED_MAX_ROWS rows (decode steps) and in_features a multiple of 64: the project's C
  kernel (quant/native.py), which decodes each block in registers and multiplies it with every row.
  Bench (k), one session: 1.8x bfloat16's tokens/s (the torch path below gave 0.29x).
- Otherwise (more rows, other shapes, no C compiler): a slice of rows at a time is dequantized into
  float32 (by the C kernel where it is built, else by a byte-pair gather: one int64 gather per byte,
  the fastest torch lookup measured, 2.3 ms for 2.9M bytes, against 10-25 ms for index_select /
  embedding / indexing) and multiplied (models/linear.py's float32 products).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from petals_like.quant import bnb, native
from petals_like.quant.nf4_code import BLOCK_SIZE, NF4_CODE

FUSED_MAX_ROWS = 8  # products of up to this many rows through the C kernel, more as float32 products (measured)


@functools.lru_cache(maxsize=None)
def _code(device: torch.device) -> Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _pair_table(device: torch.device) -> Tensor:
    """[1, 256] int64: byte b -> the float32 pair (code[b >> 4], code[b & 15]) in one 8-byte word."""
    code = _code(device)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=-1).contiguous()  # [256, 2]
    return pairs.view(torch.int64).view(1, 256)


def quantize_nf4(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(packed uint8 [ceil(n / 2)], absmax float32 [blocks]) of the flat weight, n = weight.numel()."""
    flat = weight.detach().reshape(-1).float()
    padded = -(-flat.numel() // BLOCK_SIZE) * BLOCK_SIZE
    blocks = F.pad(flat, (0, padded - flat.numel())).view(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / torch.where(absmax > 0, absmax, torch.ones_like(absmax)))[:, None]).clamp_(-1, 1)
    code = _code(flat.device)
    # nearest code value: the count of midpoints below (a midpoint itself goes to the upper value)
    indices = torch.bucketize(scaled.view(-1), (code[1:] + code[:-1]) / 2, right=True).to(torch.uint8)
    packed = (indices[0::2] << 4) | indices[1::2]
    return packed[: -(-flat.numel() // 2)].contiguous(), absmax


def dequantize_nf4_flat(packed: Tensor, absmax: Tensor, start: int, stop: int) -> Tensor:
    """Flat values [start, stop) in float32, decoding only the blocks that hold them."""
    first, last = start // BLOCK_SIZE, -(-stop // BLOCK_SIZE)
    kernel = native.nf4_kernel() if packed.device.type == "cpu" else None
    if kernel is not None and last * BLOCK_SIZE // 2 <= packed.numel():  # (the C kernel reads whole blocks)
        values = kernel.dequantize(packed, absmax, first, last - first)
    else:
        values = decode_blocks_torch(packed, absmax, first, last)
    offset = first * BLOCK_SIZE
    return values[start - offset : stop - offset]


def decode_blocks_torch(packed: Tensor, absmax: Tensor, first: int, last: int) -> Tensor:
    """Blocks [first, last) as flat float32 through torch ops (a byte-pair gather), on any device."""
    data = packed[first * BLOCK_SIZE // 2 : last * BLOCK_SIZE // 2]
    if data.numel() * 2 < (last - first) * BLOCK_SIZE:  # the padded end of the last block
        data = F.pad(data, (0, (last - first) * BLOCK_SIZE // 2 - data.numel()))
    pairs = torch.gather(_pair_table(packed.device), 1, data.long().view(1, -1)).view(torch.float32)
    return pairs.view(-1, BLOCK_SIZE).mul_(absmax[first:last, None]).view(-1)


class NF4Weight:
    """A frozen [out, in] weight in NF4; `linear(x, bias)` replaces F.linear(x, weight, bias). A
    models.linear.PackedWeight: on CPU, products of up to FUSED_MAX_ROWS rows go through the C kernel
    (quant/native.py) where it is built and in_features is a multiple of 64, larger ones through
    float32 products (one dequantized slice of rows at a time)."""

    quant_type = "nf4"
    row_multiple = 1

    def __init__(self, weight: Tensor):
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-d weight, got shape {tuple(weight.shape)}")
        self.shape = tuple(weight.shape)
        self.device = weight.device
        self.kernel: Optional[bnb.NF4Matmul] = None  # bitsandbytes' (CUDA)
        self.fused: Optional[native.NF4Kernel] = None  # the project's C kernel (CPU)
        if bnb.applies(self.device):
            self.kernel = bnb.NF4Matmul(weight, BLOCK_SIZE)
            self.data, self.absmax = self.kernel.packed, self.kernel.absmax
            return
        self.data, self.absmax = quantize_nf4(weight)
        if self.device.type == "cpu" and self.shape[1] % BLOCK_SIZE == 0:
            self.fused = native.nf4_kernel()

    @property
    def float32_min_rows(self) -> int:
        """Rows from which float32 products (models/linear.py) take over from linear()."""
        return FUSED_MAX_ROWS + 1 if self.fused is not None else 1

    @property
    def unpacks_to_float32(self) -> bool:
        return self.kernel is None  # bitsandbytes' kernel takes every product itself

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.absmax.numel() * self.absmax.element_size()

    def float32_rows(self, start: int, stop: int) -> tuple[Tensor, None]:
        columns = self.shape[1]
        return dequantize_nf4_flat(self.data, self.absmax, start * columns, stop * columns).view(stop - start, columns), None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [out, in] in dtype (autograd multiplies by it)."""
        if self.kernel is not None:
            return self.kernel.dequantize(dtype).view(self.shape)
        return self.float32_rows(0, self.shape[0])[0].to(dtype)  # (float32 already: no copy)

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.dequantize(x.dtype), bias)
        if self.kernel is not None:
            return self.kernel(x, bias)
        rows = x.numel() // x.shape[-1]
        if self.fused is not None and 0 < rows <= FUSED_MAX_ROWS:
            out = self.fused.linear(x.reshape(rows, -1).float().contiguous(), self.data, self.absmax, self.shape[0])
            if bias is not None:
                out += bias.float()
            return out.to(x.dtype).view(*x.shape[:-1], self.shape[0])
        from petals_like.models.linear import float32_products

        return float32_products(x, self, bias)
