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

bfloat16 on a CPU without native bfloat16 matmuls (oneDNN's needs AVX-512; the AVX2 EPYC above has
none): F.linear's bfloat16 product costs about as much per row as a whole matrix-vector pass, so
the matrices of one bench block took 18 ms for 16 rows and 565 ms for a 512-token prefill. From 8
rows on, the rows are multiplied in float32 instead, against the weight converted to float32 a
slice (~8 MiB) at a time: 16 rows 5.8 ms, 32 rows 11 ms, 512 rows 89 ms for one block's matrices (a
whole 8-block prefill: 0.94 s instead of 4.8 s). Small slices matter on big weights: one 4096 x
11008 matrix at 16 rows takes 19 ms in 8 MiB slices, 31 ms in 16 MiB ones, 123 ms in 64 MiB ones
(each slice is then written to memory and read back instead of staying in cache), and 66 ms through
F.linear. The result is rounded back to bfloat16; it differs from F.linear's bfloat16 product only
by that rounding.

int8 weights (quant/weights.py) take the same path from 16 rows on, on the same CPUs: each slice
converted to float32 and the row scales applied to the product. That is a little faster than
torch's int8 kernel for 16-32 rows (16 rows 6.0 vs 7.3 ms) and about 2x for a 512-token prefill (87
vs 191 ms per block), and it keeps the activations in float32 where the kernel rounds them to
bfloat16, so an int8 server's outputs depend slightly on how many rows its iteration carries
(within the int8 error bounds). 4-bit weights take it from 128 rows on (prefill chunks), where
their packed layout is one quant/weights.py reads: each slice, a whole number of the kernel's
32-row blocks, unpacked into float32 with the group scales applied. One bench block's matrices, in
three runs on two threads: 128 rows 1.0-1.3x, 256 rows 1.6-2.1x, 512 rows 1.8-2.3x faster than
through the 4-bit kernel (512 rows: 92-105 ms instead of 172-220 ms; one thread gains as much).
Unpacking costs too much for fewer rows (64: even). Set PETALS_LIKE_FLOAT32_PRODUCTS=0 to keep
bfloat16 and the quantized weights on F.linear and their kernels.

oneDNN runs float32 products of 1..32 rows without autograd (its op has no backward): those of
float32 CPU tensors and those of the slices above. Everything else, CUDA included, goes to F.linear
(or the quantized weight's own kernel). The row limit bounds memory: oneDNN compiles and keeps a
kernel for every input shape it meets (~0.6 MiB each, whatever the weight's size, and not given
back when its cache evicts one): a server whose batches took every size up to its token budget kept
growing (by ~190 MiB in five minutes of scripts/soak.py); with the limit it is ~75 MiB for the four
weight shapes of a float32 block, reached once every batch size up to 32 has occurred. Slices are
equal where the slice count divides the weight's rows (else the last is shorter: one more shape),
so a bfloat16 or int8 block meets a few shapes per matrix, times the row counts 8 (int8: 16) to 32.
Measured on 8 bench blocks after every row count 1..32 had run: float32 +79 MiB, bfloat16 +67 MiB,
int8 +65 MiB, and nothing more after a second pass. The oneDNN path is checked once against
F.linear at first use (both orientations) and switched off if it is missing or disagrees (a PyTorch
build without it, or a changed private signature): set PETALS_LIKE_ONEDNN_LINEAR=0 to turn it off.
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
_QUANT_MIN_ROWS = {  # of quantized weights, against their own kernels
    "int8": 16,  # 8 rows even, 16 rows 1.2x, 512 rows 2x faster
    "nf4": 128,  # unpacking 4 bits costs more: 64 rows even, 128 rows 1.0-1.3x, 512 rows 1.8-2.3x faster
}
_UPCAST_SLICE_BYTES = 8 << 20  # float32 copy of the weight alive at once; larger slices fall out of cache
_float32_products_on: Optional[bool] = None  # decided at first use


def linear(x: Tensor, weight, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., in] @ weight[out, in].T + bias -> [..., out], as F.linear; weight may be a QuantizedWeight."""
    if isinstance(weight, QuantizedWeight):
        if _float32_products_apply(x, weight, _QUANT_MIN_ROWS[weight.quant_type]) and weight.unpacks_to_float32:
            return _float32_products(x, weight, bias)
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
        return _float32_products(x, weight, bias)
    return F.linear(x, weight, bias)


def _float32_products_apply(x: Tensor, weight, min_rows: int) -> bool:
    weight_grad = isinstance(weight, Tensor) and weight.requires_grad
    return (
        x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight_grad))
        and x.numel() >= min_rows * x.shape[-1]
        and _float32_products_enabled()
    )


def _float32_products(x: Tensor, weight, bias: Optional[Tensor]) -> Tensor:
    """x [..., in] @ weight.T + bias computed in float32, converting the weight (bfloat16, or a
    QuantizedWeight that unpacks_to_float32) a slice at a time; the result [..., out] has x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).float()
    out_features, in_features = weight.shape
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    quantized = isinstance(weight, QuantizedWeight)
    step = _slice_rows(out_features, in_features, weight.row_multiple if quantized else 1)
    for start in range(0, out_features, step):
        part = slice(start, start + step)
        if quantized:
            values, row_scale = weight.float32_rows(start, min(start + step, out_features))
        else:
            values, row_scale = weight[part].float(), None
        product = linear(rows, values)
        if row_scale is not None:
            product *= row_scale
        if bias is not None:
            product += bias[part].float()
        out[:, part] = product
    return out.view(*x.shape[:-1], out_features)


def _slice_rows(out_features: int, in_features: int, multiple: int = 1) -> int:
    """Weight rows per float32 slice, a multiple of `multiple` (which divides out_features): within
    _UPCAST_SLICE_BYTES where it can be, and dividing out_features evenly when a slice count up to
    twice the least one does (one shape for oneDNN to compile, not two)."""
    if out_features % multiple:
        raise ValueError(f"{out_features} rows do not split into slices of a multiple of {multiple}")
    units = out_features // multiple
    least = -(-out_features * in_features * 4 // _UPCAST_SLICE_BYTES)
    count = next((n for n in range(least, 2 * least + 1) if units % n == 0), least)
    return -(-units // count) * multiple


def _float32_products_enabled() -> bool:
    """Off where bfloat16 matmuls are native (oneDNN with AVX-512) or PETALS_LIKE_FLOAT32_PRODUCTS=0."""
    global _float32_products_on
    if _float32_products_on is None:
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:  # an op missing from this build: assume the slow path, float32 is always right
            native = False
        _float32_products_on = not native and os.environ.get("PETALS_LIKE_FLOAT32_PRODUCTS", "1") != "0"
    return _float32_products_on


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
