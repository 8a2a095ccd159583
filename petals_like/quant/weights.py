"""Weight-only quantization of a span's linear layers: int8, int4 and nf4 (quant/nf4.py), quantized on load.

Choice per device (measured on the reference machine, an AVX2 EPYC, one 5632 x 1024 matmul at
batch 1: float32 2.0 ms, bfloat16 5.0 ms, bitsandbytes int8/nf4 10-30x float32):

  int8: symmetric per-output-channel absmax (LLM.int8's vector-wise weight quantization, without
        its outlier split): int8 [out, in] + one scale per output row. CPU: torch's
        `_weight_int8pack_mm` kernel with bfloat16 activations (3.7 ms, faster than bfloat16
        itself), 0.8% relative error per matmul on Gaussian weights. From 16 rows on, on CPUs
        without native bfloat16 matmuls, linear() multiplies in float32 against weight slices
        instead (models/linear.py).
  int4: 4 bits per weight in groups of 64 along the input dimension, each group with its own scale
        and offset (16 uniform levels). CPU: torch's `_weight_int4pack_mm_for_cpu` (2.3 ms with
        bfloat16 activations). NF4 (quant/nf4.py) has the same memory and a non-uniform code that
        no fast CPU kernel takes; these uniform groups run on torch's kernel at ~9% relative error
        per matmul instead of NF4's ~7.5% (Gaussian weights). The kernel's time grows with the rows about as if
        each were a matrix-vector pass (one bench block's matrices: 1 row 1.0-1.2 ms, 16 rows
        5-6 ms, 512 rows 172-220 ms), so on CPUs without native bfloat16 matmuls, from 128 rows on
        (prefill chunks), linear() unpacks the weight into float32 a slice at a time and multiplies
        in float32 instead (512 rows: 92-105 ms). That reads the kernel's private packed layout,
        which depends on the CPU: the AVX2 one is read, after a check at first use; with another
        (AVX-512's, say) the kernel keeps all rows.

  On CUDA (and on a CPU build without the 4-bit kernel) 4-bit values are packed two per byte in
  their natural order, and both formats are dequantized into the activation dtype before each
  matmul: the stored weights stay as small, the speed is that of a matmul in that dtype plus the
  dequantization (bitsandbytes' fused kernels would be faster there; see the issue log).

Memory per weight: bfloat16 2 bytes; int8 1 byte + 2 / in_features (a bfloat16 scale per row); int4
0.5 byte + 4 / 64 (a bfloat16 scale and offset per group of 64): int8 ~0.50x, int4 ~0.28x of bfloat16.

No format is swapped for another behind the operator's back: a matrix that int4 cannot take (in
features not a multiple of 64) is refused at load with the formats that can; nf4 and int8 take any.

Autograd works through a quantized layer with respect to its input (the weight is frozen): the
backward pass multiplies by the dequantized weight.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from petals_like.models.linear import stored_bytes
from petals_like.quant import bnb
from petals_like.quant.nf4 import NF4Weight

logger = logging.getLogger(__name__)

QUANT_TYPES = ("none", "int8", "int4", "nf4")
GROUP_SIZE = 64  # input features per 4-bit group
INT4_BLOCK_ROWS = 32  # output rows per block of the CPU 4-bit kernel's packed layout
_int4_layout_ok: Optional[bool] = None  # whether _unpack_int4 reads this torch's layout; decided at first use


class UnsupportedFormat(ValueError):
    """A weight format cannot hold a matrix of this model: the server does not start (it would not
    hold what it announces)."""


class QuantizedWeight:
    """A frozen [out, in] weight in int8 or 4 bits; `linear(x, bias)` replaces F.linear(x, weight, bias).
    A models.linear.PackedWeight: the block's linear() multiplies by it without knowing this module."""

    # rows from which float32 products (models/linear.py) beat the format's own kernel, measured:
    # int8 8 rows even, 16 rows 1.2x, 512 rows 2x faster; 4 bits unpack dearer: 64 even, 128 rows 1.0-1.3x
    FLOAT32_MIN_ROWS = {"int8": 16, "int4": 128}

    def __init__(self, weight: Tensor, quant_type: str):
        if quant_type not in ("int8", "int4"):
            raise ValueError(f"quant_type must be int8 or int4, got {quant_type!r}")
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-d weight, got shape {tuple(weight.shape)}")
        self.quant_type = quant_type
        self.shape = tuple(weight.shape)
        self.device = weight.device
        self.kernel_layout = False  # 4 bits packed for torch's CPU kernel (else two per byte, in order)
        w = weight.detach().float()
        out_features, in_features = self.shape
        self.kernel: Optional[bnb.Int8Matmul] = None  # bitsandbytes' LLM.int8() (CUDA)
        if quant_type == "int8" and bnb.applies(self.device):
            self.kernel = bnb.Int8Matmul(weight)
            self.data, self.scale = self.kernel.codes, self.kernel.row_absmax
            return
        if quant_type == "int8":
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            self.data = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(torch.bfloat16)  # [out]
            return
        if in_features % GROUP_SIZE:
            raise UnsupportedFormat(
                f"int4 needs in_features divisible by {GROUP_SIZE}, and this [{out_features}, {in_features}] matrix "
                "has not: use --quant_type nf4 or int8, which take any shape"
            )
        groups = w.view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        step = (high - low).clamp(min=1e-12) / 15
        levels = torch.round((groups - low[..., None]) / step[..., None]).clamp(0, 15).to(torch.int32)
        # kernel convention: w = (level - 8) * scale + zero, scales_and_zeros [groups, out, 2]
        zero = low + 8 * step
        self.scales_and_zeros = torch.stack([step.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        levels = levels.view(out_features, in_features)
        # the CPU kernel takes whole blocks of 16 rows; other widths (tiny test models) stay two per byte
        self.kernel_layout = self.device.type == "cpu" and out_features % 16 == 0 and _int4_kernel_available()
        if self.kernel_layout:
            self.data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.contiguous(), 1)
        else:
            self.data = (levels[:, 0::2] | (levels[:, 1::2] << 4)).to(torch.uint8)  # [out, in / 2]

    @property
    def nbytes(self) -> int:
        extra = self.scale if self.quant_type == "int8" else self.scales_and_zeros
        return self.data.numel() * self.data.element_size() + extra.numel() * extra.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [out, in] in dtype: what CUDA multiplies by, and autograd on any device."""
        if self.kernel is not None:
            return self.kernel.dequantize(dtype)
        if self.quant_type == "int8":
            return self.data.to(dtype) * self.scale.to(dtype)[:, None]
        if not self.kernel_layout:
            return self._nibble_rows(0, self.shape[0], dtype)
        if self.unpacks_to_float32:
            return self.float32_rows(0, self.shape[0])[0].to(dtype).contiguous()
        return self.kernel_weight().to(dtype)

    def kernel_weight(self) -> Tensor:
        """A 4-bit weight as the CPU kernel multiplies by, float32 [out, in]: the kernel's product
        with the identity (so rounded to bfloat16, the kernel's output dtype)."""
        eye = torch.eye(self.shape[1], dtype=torch.bfloat16, device=self.device)
        return self._int4_mm(eye).t().float().contiguous()  # [in, out] -> [out, in]

    @property
    def unpacks_to_float32(self) -> bool:
        """Whether float32_rows() works: always, except under bitsandbytes (its own kernel takes
        every product) and for 4 bits in the CPU kernel's layout where the rows do not make whole
        blocks of it or this torch packs in a layout _unpack_int4 does not know."""
        if self.kernel is not None:
            return False
        if not self.kernel_layout:
            return True
        return self.shape[0] % INT4_BLOCK_ROWS == 0 and _int4_layout_known()

    @property
    def float32_min_rows(self) -> int:
        return self.FLOAT32_MIN_ROWS[self.quant_type]

    @property
    def row_multiple(self) -> int:
        """float32_rows() takes row ranges in multiples of this."""
        return INT4_BLOCK_ROWS if self.kernel_layout else 1

    def float32_rows(self, start: int, stop: int) -> tuple[Tensor, Optional[Tensor]]:
        """Weight rows [start, stop) in float32 for a float32 product, and the scale per row that
        the product still needs. int8: the raw levels and the row scales; 4 bits: the weight itself
        ([rows, in], not contiguous in the kernel's layout) and None."""
        if start % self.row_multiple or stop % self.row_multiple:
            raise ValueError(f"rows [{start}, {stop}) of a 4-bit weight must be whole blocks of {self.row_multiple}")
        if self.quant_type == "int8":
            return self.data[start:stop].float(), self.scale[start:stop].float()
        if not self.kernel_layout:
            return self._nibble_rows(start, stop, torch.float32), None
        step, offset = self._group_affine(start, stop, torch.float32)
        weight_t = _unpack_int4(self.data[start:stop], self.shape[1])  # [in, rows], levels 0..15
        grouped = weight_t.view(-1, GROUP_SIZE, stop - start)
        grouped.mul_(step[:, None]).add_(offset[:, None])  # contiguous factors: strided ones take 4x longer
        return weight_t.t(), None

    def _nibble_rows(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Rows [start, stop) of a 4-bit weight packed two per byte, in dtype, [rows, in]."""
        step, offset = self._group_affine(start, stop, dtype)
        packed = self.data[start:stop]
        weight = torch.stack([packed & 15, packed >> 4], dim=-1).view(stop - start, -1).to(dtype)
        weight.view(stop - start, -1, GROUP_SIZE).mul_(step.t()[..., None]).add_(offset.t()[..., None])
        return weight

    def _group_affine(self, start: int, stop: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(step, offset) per group and row [groups, rows], contiguous, in dtype: a 4-bit level
        stands for level * step + offset = (level - 8) * step + zero."""
        step, zero = self.scales_and_zeros[:, start:stop].float().unbind(-1)
        return step.to(dtype).contiguous(), (zero - 8 * step).to(dtype)

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.dequantize(x.dtype), bias)
        if self.kernel is not None:
            return self.kernel(x, bias)
        flat = x.reshape(-1, x.shape[-1])
        # (the int8 kernel reads rows in steps of 16: other widths, in tiny test models only, take
        # the dequantizing path below, as CUDA does)
        kernel = self.kernel_layout if self.quant_type == "int4" else self.shape[1] % 16 == 0
        if x.device.type == "cpu" and kernel:
            compute = flat.to(torch.bfloat16)
            if self.quant_type == "int8":
                out = torch.ops.aten._weight_int8pack_mm(compute, self.data, self.scale)
            else:
                out = self._int4_mm(compute)
            out = out.to(x.dtype)
        else:
            out = F.linear(flat, self.dequantize(x.dtype))
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], self.shape[0])

    def _int4_mm(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.data, GROUP_SIZE, self.scales_and_zeros)


def _int4_kernel_available() -> bool:
    """Whether this torch build has the CPU 4-bit kernel (and its packing op)."""
    ops = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
    return all(hasattr(torch.ops.aten, op) for op in ops)


def _unpack_int4(packed: Tensor, in_features: int) -> Tensor:
    """float32 levels [in, rows] of packed rows that make whole blocks of the CPU 4-bit kernel's
    layout (torch's own and private, so _int4_layout_known checks it): each block of 32 output
    rows is in_features runs of 16 bytes, and byte j of input k's run holds the level of the
    block's row j in its low four bits and of its row 16 + j in the high four. (That is the
    layout of AVX2 builds; AVX-512 ones use blocks of 64 and are recognized as unknown.)"""
    runs = packed.view(-1, in_features, 16).permute(1, 0, 2)  # [in, blocks, 16]
    levels = torch.empty(in_features, runs.shape[1], 2, 16, device=packed.device)
    levels[:, :, 0] = runs & 15
    levels[:, :, 1] = runs >> 4
    return levels.view(in_features, -1)


def _int4_layout_known() -> bool:
    global _int4_layout_ok
    if _int4_layout_ok is None:
        shape = (2 * INT4_BLOCK_ROWS, 2 * GROUP_SIZE)
        levels = torch.randint(0, 16, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels, 1)
            _int4_layout_ok = torch.equal(_unpack_int4(packed, shape[1]).t(), levels.float())
        except Exception:  # the private ops missing, or packing another way
            _int4_layout_ok = False
        if not _int4_layout_ok:
            logger.info(
                "this torch build packs 4-bit weights in a layout not read here: 4-bit products of many rows stay on its kernel"
            )
    return _int4_layout_ok


def quantize(weight: Tensor, quant_type: str) -> QuantizedWeight | NF4Weight:
    """The weight in `quant_type` (int8, int4 or nf4); ValueError for a matrix that format cannot take."""
    if quant_type == "nf4":
        return NF4Weight(weight)
    return QuantizedWeight(weight, quant_type)


def quantize_block(block, quant_type: str) -> None:
    """Replace a fused LlamaBlock's four weight matrices by quantized ones (call after fuse_projections)."""
    if quant_type == "none":
        return
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    block.replace_linear_weights(lambda weight: quantize(weight, quant_type), quant_type)


def linear_weight_bytes(block) -> int:
    """Bytes of the block's linear-layer weights as stored (quantized or not); a block after fuse_projections()."""
    return sum(stored_bytes(weight) for weight, _ in block.linear_weights().values())
