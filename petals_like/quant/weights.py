"""Weight-only quantization of a span's linear layers: int8 and 4-bit, quantized on load.

Choice per device (measured on the reference machine, an AVX2 EPYC, one 5632 x 1024 matmul at
batch 1: float32 2.0 ms, bfloat16 5.0 ms, bitsandbytes int8/nf4 10-30x float32):

  int8: symmetric per-output-channel absmax (LLM.int8's vector-wise weight quantization, without
        its outlier split): int8 [out, in] + one scale per output row. CPU: torch's
        `_weight_int8pack_mm` kernel with bfloat16 activations (3.7 ms, faster than bfloat16
        itself), 0.8% relative error per matmul on Gaussian weights. From 16 rows on, on CPUs
        without native bfloat16 matmuls, linear() multiplies in float32 against weight slices
        instead (models/linear.py).
  nf4:  4 bits per weight in groups of 64 along the input dimension, each group with its own scale
        and offset (16 levels). CPU: torch's `_weight_int4pack_mm_for_cpu` (2.3 ms with bfloat16
        activations). NF4's non-uniform codebook has no fast CPU kernel; uniform 16-level groups of
        64 keep the same memory (4 bits + 1 bit of group scales per weight) at ~9% relative error
        per matmul instead of NF4's ~7.5%. On CUDA the same layouts are dequantized into the
        activation dtype before the matmul (bitsandbytes would be faster there; see the issue log).

Memory per weight: bfloat16 2 bytes; int8 1 byte + 4 / in_features; nf4 0.5 byte + 8 / 64
(bfloat16 scale and offset per group of 64): int8 ~0.50x, nf4 ~0.31x of bfloat16.

Autograd works through a quantized layer with respect to its input (the weight is frozen): the
backward pass multiplies by the dequantized weight.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

QUANT_TYPES = ("none", "int8", "nf4")
GROUP_SIZE = 64  # input features per 4-bit group


class QuantizedWeight:
    """A frozen [out, in] weight in int8 or 4 bits; `linear(x, bias)` replaces F.linear(x, weight, bias)."""

    def __init__(self, weight: Tensor, quant_type: str):
        if quant_type not in ("int8", "nf4"):
            raise ValueError(f"quant_type must be int8 or nf4, got {quant_type!r}")
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-d weight, got shape {tuple(weight.shape)}")
        self.quant_type = quant_type
        self.shape = tuple(weight.shape)
        self.device = weight.device
        w = weight.detach().float()
        out_features, in_features = self.shape
        if quant_type == "int8":
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
            self.data = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(torch.bfloat16)  # [out]
            return
        if in_features % GROUP_SIZE:
            raise ValueError(f"nf4 needs in_features divisible by {GROUP_SIZE}, got {in_features}")
        groups = w.view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        step = (high - low).clamp(min=1e-12) / 15
        levels = torch.round((groups - low[..., None]) / step[..., None]).clamp(0, 15).to(torch.int32)
        # kernel convention: w = (level - 8) * scale + zero, scales_and_zeros [groups, out, 2]
        zero = low + 8 * step
        self.scales_and_zeros = torch.stack([step.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.data = _pack_int4(levels.view(out_features, in_features), self.device)

    @property
    def nbytes(self) -> int:
        extra = self.scale if self.quant_type == "int8" else self.scales_and_zeros
        return self.data.numel() * self.data.element_size() + extra.numel() * extra.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.quant_type == "int8":
            return (self.data.to(dtype) * self.scale.to(dtype)[:, None]).contiguous()
        eye = torch.eye(self.shape[1], dtype=torch.bfloat16, device=self.device)
        return self._int4_mm(eye).t().to(dtype).contiguous()  # x = I recovers the weight, [in, out] -> [out, in]

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.dequantize(x.dtype), bias)
        flat = x.reshape(-1, x.shape[-1])
        if x.device.type == "cpu" and (self.quant_type == "nf4" or self.shape[1] % 16 == 0):
            # (the int8 kernel reads rows in steps of 16: other widths, in tiny test models only,
            # take the dequantizing path below)
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


def _pack_int4(levels: Tensor, device: torch.device) -> Tensor:
    if device.type != "cpu":
        raise NotImplementedError("4-bit weights are implemented for CPU servers; use int8 or none on CUDA")
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.contiguous(), 1)


def quantize(weight: Tensor, quant_type: str) -> QuantizedWeight:
    """The CPU 4-bit kernel needs in_features divisible by GROUP_SIZE and out_features by 16 (true
    of real models: 4096, 11008, 14336, ...); a matrix without them (tiny test models) is stored in
    int8 instead."""
    if quant_type == "nf4" and (weight.shape[1] % GROUP_SIZE or weight.shape[0] % 16):
        quant_type = "int8"
    return QuantizedWeight(weight, quant_type)


def quantize_block(block, quant_type: str) -> None:
    """Replace a fused LlamaBlock's four weight matrices by quantized ones (call after fuse_projections)."""
    if quant_type == "none":
        return
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if block._qkv is None or block._gate_up is None:
        raise ValueError("quantize_block() needs a block after fuse_projections()")
    attn, mlp = block.self_attn, block.mlp
    block._qkv = (quantize(block._qkv[0], quant_type), block._qkv[1])
    block._gate_up = (quantize(block._gate_up[0], quant_type), block._gate_up[1])
    block._o = (quantize(attn.o_proj.weight, quant_type), attn.o_proj.bias)
    block._down = (quantize(mlp.down_proj.weight, quant_type), mlp.down_proj.bias)
    block.quant_type = quant_type
    # the float weights go: the separate Linears are views of the fused tensors, o/down are their own
    for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        linear.weight = None


def linear_weight_bytes(block) -> int:
    """Bytes of the block's linear-layer weights as stored (quantized or not)."""
    if getattr(block, "quant_type", "none") != "none":
        return sum(w.nbytes for w, _ in (block._qkv, block._gate_up, block._o, block._down))
    linears = (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj,
               block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)  # fmt: skip
    return sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
