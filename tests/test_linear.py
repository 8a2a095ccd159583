"""linear(): the inference matmul equals F.linear, and autograd still works through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from petals_like.models import linear as linear_module
from petals_like.models.linear import linear


@pytest.mark.parametrize("rows", [1, 2, 7, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(rows: int, bias: bool):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator)
    w = torch.randn(80, 96, generator=generator)
    b = torch.randn(80, generator=generator) if bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    # leading dimensions are kept, as F.linear does
    with torch.inference_mode():
        assert linear(x.view(1, rows, 96), w, b).shape == (1, rows, 80)


@pytest.mark.parametrize("rows", [1, 5])
def test_linear_output_is_contiguous_and_takes_any_weight_layout(rows: int):
    """From 2 rows on, the product runs as (weight @ x.T).T: what comes back is still a plain
    [rows, out] tensor, and a weight that is a view (e.g. a transposed matrix) gives the same values."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 40, generator=generator)
    w = torch.randn(40, 24, generator=generator).t()  # [24, 40], not contiguous
    b = torch.randn(24, generator=generator)
    with torch.inference_mode():
        got = linear(x, w, b)
        plain = linear(x, w.contiguous(), b)
    assert got.is_contiguous() and plain.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_linear_keeps_autograd():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(0).expand(4, 8))
    torch.testing.assert_close(w.grad, x.detach().sum(0).expand(3, 8))


def test_few_bfloat16_rows_go_through_f_linear():
    x, w = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("rows", [8, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_many_bfloat16_rows_are_multiplied_in_float32_a_weight_slice_at_a_time(monkeypatch, rows: int, bias: bool):
    """Without native bfloat16 matmuls, 8+ rows go through float32 products against slices of the
    weight; the answer is the float32 product rounded to bfloat16, whatever the slicing."""
    monkeypatch.setattr(linear_module, "_native_bf16", False)
    monkeypatch.setattr(linear_module, "_UPCAST_SLICE_BYTES", 7 * 64 * 4)  # 50 weight rows: 8 slices of <= 7
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows // 2, 64, generator=generator).bfloat16()
    w = torch.randn(50, 64, generator=generator).bfloat16()
    b = torch.randn(50, generator=generator).bfloat16() if bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
    expected = F.linear(x.float(), w.float(), None if b is None else b.float()).bfloat16()
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows // 2, 50)
    # the float32 sums may differ in their last bits (another kernel), so allow one bfloat16 step
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-2)


def test_many_rows_go_through_f_linear():
    """oneDNN keeps a compiled kernel per row count; above a handful of rows, where it gains nothing,
    F.linear runs instead, so a server's memory does not grow with every batch size it meets."""
    x, w = torch.randn(33, 32), torch.randn(16, 32)
    with torch.inference_mode():
        assert torch.equal(linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("rows", [4, 40])
def test_int8_weights_match_their_dequantized_product_below_and_above_the_float32_row_threshold(monkeypatch, rows: int):
    """Few rows go through the int8 kernel (bfloat16 activations), many through float32 products
    of weight slices with the row scales applied: both are the product with the dequantized weight."""
    from petals_like.quant.weights import QuantizedWeight

    monkeypatch.setattr(linear_module, "_native_bf16", False)
    monkeypatch.setattr(linear_module, "_UPCAST_SLICE_BYTES", 7 * 64 * 4)  # 50 weight rows: 8 slices of <= 7
    generator = torch.Generator().manual_seed(rows)
    weight = QuantizedWeight(torch.randn(50, 64, generator=generator), "int8")
    x, b = torch.randn(rows, 64, generator=generator), torch.randn(50, generator=generator)
    with torch.inference_mode():
        got = linear(x, weight, b)
    expected = F.linear(x, weight.dequantize(torch.float32), b)
    tolerance = 1e-5 if rows >= linear_module._INT8_MIN_ROWS else 2e-2  # the kernel rounds x to bfloat16
    assert got.shape == (rows, 50) and got.dtype == torch.float32
    assert float((got - expected).norm() / expected.norm()) < tolerance
