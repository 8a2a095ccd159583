"""linear(): F.linear for inference, through oneDNN on CPU when it is faster.

Why: on CPU the default BLAS is slow for the few rows of a decode step, and bfloat16 or quantized
products of many rows are faster in float32 where bfloat16 matmuls are not native. Measurements:
docs/benchmarks.md, "Inference matmul".

float32 products of 1..32 rows go through oneDNN without autograd; from 2 rows on either directly or as
(weight @ x.T).T, whichever this machine runs faster (measured once per process, _prefer_swapped: on
the AVX2 machines measured first the swapped form won, on an AVX-512 VM the direct one is 1.4x faster
for a 16-row iteration of the bench MoE blocks); the row limit bounds oneDNN's kernel cache, which
keeps one kernel per input shape. bfloat16 (8+ rows),
int8 (16+) and 4-bit (128+) weights are multiplied in float32 a weight slice at a time. The oneDNN
path is checked against F.linear at first use; PETALS_LIKE_ONEDNN_LINEAR=0 turns it off, and
PETALS_LIKE_FLOAT32_PRODUCTS=0 the float32 products. Everything else, CUDA included, goes to F.linear
(or the quantized weight's own kernel).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

_MIN_ROWS = 1  # one row too: faster than the default BLAS's matrix-vector path on the CPUs measured
_MAX_ROWS = 32  # oneDNN's gain is for a handful of rows; each new row count costs a kernel kept in memory
_onednn_ok: Optional[bool] = None  # decided at first use
_swapped_ok: Optional[bool] = None  # decided at first use (_prefer_swapped)
_BF16_MIN_ROWS = 8  # float32 products of bfloat16 rows: 4 rows about break even, 8 rows are 2x faster
_UPCAST_SLICE_BYTES = 8 << 20  # float32 copy of the weight alive at once; larger slices fall out of cache
_float32_products_on: Optional[bool] = None  # decided at first use


class PackedWeight(Protocol):
    """A weight stored in another form (quant/weights.py's QuantizedWeight): what linear() needs of it."""

    shape: tuple[int, int]  # [out, in]
    nbytes: int  # bytes as stored
    float32_min_rows: int  # rows from which float32 products beat its own kernel
    unpacks_to_float32: bool  # float32_rows() works
    row_multiple: int  # float32_rows() takes row ranges in multiples of this

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor: ...

    def float32_rows(self, start: int, stop: int) -> tuple[Tensor, Optional[Tensor]]: ...


def stored_bytes(weight: Tensor | PackedWeight) -> int:
    """Bytes of a weight as stored: a tensor's, or a PackedWeight's packed form."""
    return weight.numel() * weight.element_size() if isinstance(weight, Tensor) else weight.nbytes


def linear(x: Tensor, weight: Tensor | PackedWeight, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., in] @ weight[out, in].T + bias -> [..., out], as F.linear; weight may be a PackedWeight."""
    if not isinstance(weight, Tensor):
        if _float32_products_apply(x, weight, weight.float32_min_rows) and weight.unpacks_to_float32:
            return float32_products(x, weight, bias)
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
        if flat.shape[0] == 1 or not weight.is_contiguous() or not _prefer_swapped():
            out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
        else:
            out = _swapped(flat, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    if x.dtype == weight.dtype == torch.bfloat16 and _float32_products_apply(x, weight, _BF16_MIN_ROWS):
        return float32_products(x, weight, bias)
    return F.linear(x, weight, bias)


def _float32_products_apply(x: Tensor, weight, min_rows: int) -> bool:
    weight_grad = isinstance(weight, Tensor) and weight.requires_grad
    return (
        x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight_grad))
        and x.numel() >= min_rows * x.shape[-1]
        and _float32_products_enabled()
    )


def float32_products(x: Tensor, weight, bias: Optional[Tensor]) -> Tensor:
    """x [..., in] @ weight.T + bias computed in float32, converting the weight (bfloat16, or a
    QuantizedWeight that unpacks_to_float32) a slice at a time; the result [..., out] has x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).float()
    out_features, in_features = weight.shape
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    quantized = not isinstance(weight, Tensor)
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


def _prefer_swapped() -> bool:
    """Whether (weight @ x.T).T beats oneDNN's direct product of a few rows on this machine; measured once
    per process on 8 rows against weights larger than the caches (what decode streams), unless
    PETALS_LIKE_SWAPPED_LINEAR=0|1 says. Swapped must win by 10%: otherwise the direct form stays."""
    global _swapped_ok
    if _swapped_ok is None:
        setting = os.environ.get("PETALS_LIKE_SWAPPED_LINEAR")
        _swapped_ok = setting == "1" if setting in ("0", "1") else _measure_swapped()
        logger.debug(f"float32 products of 2..{_MAX_ROWS} rows: {'(weight @ x.T).T' if _swapped_ok else 'direct'}")
    return _swapped_ok


def _measure_swapped(rounds: int = 3) -> bool:
    weights = [torch.full((1024, 1024), 0.5 + i) for i in range(12)]  # 48 MiB
    x = torch.full((8, 1024), 0.25)

    def best(product) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(rounds):
                started = time.perf_counter()
                for weight in weights:
                    product(weight)
                times.append(time.perf_counter() - started)
        return min(times)

    direct = best(lambda w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    swapped = best(lambda w: _swapped(x, w, None))
    return swapped < 0.9 * direct


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
