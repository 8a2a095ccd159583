"""bitsandbytes' kernels for quantized weights on CUDA: LLM.int8() and NF4 (`pip install petals_like[cuda]`).

On CUDA, int8 and nf4 weights are quantized by bitsandbytes itself and multiplied by its kernels:
int8 as LLM.int8() (vector-wise int8 weights and activations, and the activation columns with
values above the outlier threshold multiplied in 16 bits: the outlier decomposition), nf4 with its
fused 4-bit matmul. On CPU the project's own kernels stay (quant/weights.py, quant/nf4.py): measured
there, bitsandbytes' CPU paths were 10-30x slower than float32 for a 5632 x 1024 matmul at batch 1.
Without bitsandbytes a CUDA server falls back to dequantizing into the activation dtype before each
matmul (same stored bytes, slower), and says so once in its log.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s: activation columns with a magnitude above it run in 16 bits


@functools.lru_cache(maxsize=None)
def _module() -> Optional[Any]:
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def applies(device: torch.device) -> bool:
    """Whether weights on `device` use bitsandbytes: CUDA with the package installed."""
    if device.type != "cuda":
        return False
    if _module() is None:
        _warn_missing()
        return False
    return True


@functools.lru_cache(maxsize=None)
def _warn_missing() -> None:
    logger.warning(
        "bitsandbytes is not installed: quantized weights on CUDA are dequantized before each matmul "
        "(pip install petals_like[cuda])"
    )


class Int8Matmul:
    """LLM.int8() for one frozen weight [out, in]: bitsandbytes' vector-wise int8 weight (one absmax
    per row) and its mixed-precision matmul."""

    def __init__(self, weight: Tensor):
        bnb = _module()
        self.codes, self.row_absmax, _ = bnb.functional.int8_vectorwise_quant(weight.detach().half())
        self.state = bnb.MatmulLtState()
        self.state.threshold = OUTLIER_THRESHOLD
        self.state.has_fp16_weights = False
        self.state.is_training = False
        self.state.CB, self.state.SCB = self.codes, self.row_absmax

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.row_absmax.numel() * self.row_absmax.element_size()

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return (self.codes.float() * (self.row_absmax.float() / 127)[:, None]).to(dtype)

    def __call__(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        compute = x if x.dtype in (torch.float16, torch.bfloat16) else x.half()
        out = _module().matmul(compute, self.codes, state=self.state, bias=None if bias is None else bias.to(compute.dtype))
        return out.to(x.dtype)


class NF4Matmul:
    """NF4 for one frozen weight [out, in]: bitsandbytes' quantize_4bit (blocks of 64, as quant/nf4.py
    stores them on CPU) and its 4-bit matmul."""

    def __init__(self, weight: Tensor, block_size: int):
        self.packed, self.state = _module().functional.quantize_4bit(weight.detach(), blocksize=block_size, quant_type="nf4")

    @property
    def absmax(self) -> Tensor:
        return self.state.absmax

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        return _module().functional.dequantize_4bit(self.packed, self.state).to(dtype)

    def __call__(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        out = _module().matmul_4bit(x.to(self.state.dtype), self.packed.t(), quant_state=self.state)
        out = out.to(x.dtype)
        return out if bias is None else out + bias
