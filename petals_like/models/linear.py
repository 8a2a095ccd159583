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

Used only without autograd (oneDNN's op has no backward), only for float32 CPU tensors (its
bfloat16 path needs AVX-512, which this machine lacks) and only for 1..32 rows; everything else,
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


def linear(x: Tensor, weight, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., in] @ weight[out, in].T + bias -> [..., out], as F.linear; weight may be a QuantizedWeight."""
    if isinstance(weight, QuantizedWeight):
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
    return F.linear(x, weight, bias)


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
