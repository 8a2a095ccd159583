"""linear(): F.linear for inference, through oneDNN on CPU when it is faster.

Decode steps multiply a handful of rows (1-32) by each weight matrix. On CPUs where PyTorch's
default BLAS picks a slow small-matrix path (measured on an AVX2 AMD EPYC: 4 rows cost 3.4x one
row through F.linear for a 32000 x 1024 LM head, 1.9x through oneDNN), oneDNN's matmul is up to
twice as fast for those shapes, and faster for one row too (the 32 matrices of 8 bench-model
blocks: 17 ms vs 26 ms through F.linear; a whole 8-block decode step 25 ms vs 29 ms).

From 2 rows on, the product is computed the other way round: (weight @ x.T).T, i.e. oneDNN sees
the weight as its input matrix and the few rows as its weight. It then streams the big matrix
in its stored layout and only rearranges the few rows, instead of repacking a weight matrix
(or much of it) on every call. Measured on the same machine, the four matrices of 8 fused bench
blocks: 16 rows 31-33 ms vs 43-45 ms, 8 rows 25 vs 38 ms, 2 rows 25 vs 29 ms, and a 16-row LM
head 12 ms vs 16 ms. It reads the ordinary dense weight, so no second, reordered copy of the
weights is kept.

bfloat16 on a CPU without native bfloat16 matmuls (oneDNN's needs AVX-512; the AVX2 EPYC above
has none): F.linear's bfloat16 product costs about as much per row as a whole matrix-vector pass,
so 16 rows took 18 ms per bench block and a 512-token prefill 565 ms. From 8 rows on, the rows are
multiplied in float32 instead, against the weight converted to float32 a slice (<= 64 MiB) at a
time: 16 rows 5.4 ms, 32 rows 8 ms, 512 rows 82 ms per block; the result is rounded back to
bfloat16 (it differs from F.linear's bfloat16 product only by that rounding). int8 weights
(quant/weights.py) take the same path from 16 rows on, each slice converted to float32 and the
row scales applied to the product: about even with torch's int8 kernel for 16-32 rows, 1.6x
faster for a 512-token prefill (90 vs 144 ms per bench block), and without the kernel's rounding
of the activations to bfloat16.

Used only without autograd (oneDNN's op has no backward), only for float32 CPU tensors and only
for 1..32 rows (bfloat16 as above); everything else,
CUDA included, goes to F.linear. The row limit bounds memory: oneDNN compiles and keeps a kernel
for every input shape it meets (~0.6 MiB each, whatever the weight's size, and not given back
when its cache evicts one): a server whose batches took every size up to its token budget kept
growing (by ~190 MiB in five minutes of scripts/soak.py); with the limit it is ~75 MiB for the
four weight shapes of a block, reached once every batch size up to 32 has occurred. The oneDNN
path is checked once against F.linear at first use (both orientations) and switched off if it
is missing or disagrees (a PyTorch build without it, or a changed private signature): set
PETALS_LIKE_ONEDNN_LINEAR=0 to turn it off.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from petals_like.quant.weights import QuantizedWeight

logger = logging.getLogger(__name__)

_MIN_ROWS = 1  # one row too: faster than the default BLAS's matrix-vector path on the CPUs measured
_MAX_ROWS = 32  # oneDNN's gain is for a handful of rows; each new row count costs a kernel kept in memory
_onednn_ok: Optional[bool] = None  # decided at first use
_BF16_MIN_ROWS = 8  # float32 products of bfloat16 rows: 4 rows about break even, 8 rows are 2x faster
_INT8_MIN_ROWS = 16  # of int8 weights, vs the int8 kernel: 16-32 rows even, 128 rows 1.1x, 512 rows 1.6x faster
_UPCAST_SLICE_BYTES = 64 << 20  # float32 copy of the weight alive at once
_native_bf16: Optional[bool] = None


def linear(x: Tensor, weight, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., in] @ weight[out, in].T + bias -> [..., out], as F.linear; weight may be a QuantizedWeight."""
    if isinstance(weight, QuantizedWeight):
        if weight.quant_type == "int8" and _float32_products_apply(x, weight.data, _INT8_MIN_ROWS):
            out = _float32_products(x.reshape(-1, x.shape[-1]), weight.data, bias, weight.scale)
            return out.view(*x.shape[:-1], weight.shape[0])
        return weight.linear(x, bias)
    if (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype == torch.float32  # bfloat16: oneDNN needs AVX-512 for it; F.linear works everywhere
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and _MIN_ROWS * x.shape[-1] <= x.numel() <= _MAX_ROWS * x.shape[-1]
        and _onednn_available()
    ):
        flat = x.reshape(-1, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if flat.shape[0] == 1 or not weight.is_contiguous():
            out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
        else:
            out = _swapped(flat, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    if x.dtype == weight.dtype == torch.bfloat16 and _float32_products_apply(x, weight, _BF16_MIN_ROWS):
        out = _float32_products(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _float32_products_apply(x: Tensor, weight: Tensor, min_rows: int) -> bool:
    return (
        x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and x.numel() >= min_rows * x.shape[-1]
        and not _has_native_bf16()
    )


def _float32_products(flat: Tensor, weight: Tensor, bias: Optional[Tensor], row_scale: Optional[Tensor] = None) -> Tensor:
    """flat [rows, in] @ (weight * row_scale[:, None]).T + bias computed in float32, converting the
    (bfloat16 or int8) weight a slice at a time; the result has flat's dtype."""
    rows = flat.float()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=flat.dtype)
    slices = -(-weight.numel() * 4 // _UPCAST_SLICE_BYTES)
    step = -(-weight.shape[0] // slices)  # equal slices: fewer distinct shapes for oneDNN to compile
    for start in range(0, weight.shape[0], step):
        part = slice(start, start + step)
        product = linear(rows, weight[part].float())
        if row_scale is not None:
            product *= row_scale[part].float()
        if bias is not None:
            product += bias[part].float()
        out[:, part] = product
    return out


def _has_native_bf16() -> bool:
    global _native_bf16
    if _native_bf16 is None:
        try:
            _native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # an op missing from this build: assume the slow path, float32 is always right
            _native_bf16 = False
    return _native_bf16


def _swapped(flat: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """flat [rows, in] @ weight.T + bias as (weight @ flat.T).T, contiguous [rows, out]."""
    out = torch.ops.mkldnn._linear_pointwise(weight, flat, None, "none", [], "").t().contiguous()
    if bias is not None:
        out += bias
    return out


def _onednn_available() -> bool:
    global _onednn_ok
    if _onednn_ok is None:
        _onednn_ok = _check_onednn()
    return _onednn_ok


def _check_onednn() -> bool:
    if os.environ.get("PETALS_LIKE_ONEDNN_LINEAR", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(shape, generator=generator) for shape in ((3, 64), (48, 64), (48,)))
        with torch.inference_mode():
            expected = F.linear(x, w, b)
            results = (torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), _swapped(x, w, b))
        ok = all(got.shape == (3, 48) and torch.allclose(got, expected, rtol=1e-4, atol=1e-4) for got in results)
    except Exception as e:  # an op missing from this build or with another signature
        logger.debug(f"oneDNN linear unavailable: {e!r}")
        return False
    if not ok:
        logger.warning("oneDNN linear disagrees with F.linear on this machine; using F.linear")
    return ok
