"""linear(): the inference matmul equals F.linear, and autograd still works through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from petals_like.models import linear as linear_module
from petals_like.models.linear import linear


@pytest.fixture(params=["direct", "swapped"])
def few_row_form(request, monkeypatch) -> str:
    """Both forms of oneDNN's few-row products, whichever this machine measured faster."""
    monkeypatch.setattr(linear_module, "_swapped_ok", request.param == "swapped")
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 7, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(rows: int, bias: bool, few_row_form: str):
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
def test_linear_output_is_contiguous_and_takes_any_weight_layout(rows: int, few_row_form: str):
    """From 2 rows on, the product may run as (weight @ x.T).T: what comes back is still a plain
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


def test_weight_slices_are_equal_where_they_can_be(monkeypatch):
    monkeypatch.setattr(linear_module, "_UPCAST_SLICE_BYTES", 7 * 64 * 4)
    assert linear_module._slice_rows(50, 64) == 5  # 8 slices would be the fewest; 10 divide 50
    assert linear_module._slice_rows(53, 64) == 7  # a prime: 8 slices, the last one shorter
    assert linear_module._slice_rows(7, 64) == 7  # fits in one


@pytest.mark.parametrize("rows", [7, 8, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_many_bfloat16_rows_are_multiplied_in_float32_a_weight_slice_at_a_time(float32_products, rows: int, bias: bool):
    """From 8 rows on, bfloat16 rows go through float32 products against slices of the weight;
    the answer is the float32 product rounded to bfloat16, whatever the slicing or input layout."""
    generator = torch.Generator().manual_seed(rows)
    if rows % 2:
        x = torch.randn(1, rows, 64, generator=generator).bfloat16()
    else:  # batched and not contiguous
        x = torch.randn(rows // 2 + 1, 2, 64, generator=generator).bfloat16().transpose(0, 1)[:, : rows // 2]
    w = torch.randn(50, 64, generator=generator).bfloat16()
    b = torch.randn(50, generator=generator).bfloat16() if bias else None
    with torch.inference_mode():
        got = linear(x, w, b)
    assert float32_products == ([] if rows < 8 else [rows])
    assert got.dtype == torch.bfloat16 and got.shape == (*x.shape[:-1], 50)
    if rows < 8:
        assert torch.equal(got, F.linear(x, w, b))
        return
    expected = F.linear(x.float(), w.float(), None if b is None else b.float()).bfloat16()
    # the float32 sums may differ in their last bits (another kernel), so allow one bfloat16 step
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-2)


def test_bfloat16_rows_stay_on_f_linear_where_bfloat16_is_native_or_gradients_are_needed(float32_products, monkeypatch):
    x, w = torch.randn(16, 64, dtype=torch.bfloat16), torch.randn(50, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(linear_module, "_float32_products_on", False)
    with torch.inference_mode():
        assert torch.equal(linear(x, w), F.linear(x, w))
    monkeypatch.setattr(linear_module, "_float32_products_on", True)
    x.requires_grad_(True)
    linear(x, w).float().sum().backward()
    assert float32_products == [] and x.grad is not None and x.grad.shape == x.shape


def test_many_rows_go_through_f_linear():
    """oneDNN keeps a compiled kernel per row count; above a handful of rows, where it gains nothing,
    F.linear runs instead, so a server's memory does not grow with every batch size it meets."""
    x, w = torch.randn(33, 32), torch.randn(16, 32)
    with torch.inference_mode():
        assert torch.equal(linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("rows", [4, 16, 40])
def test_int8_weights_match_their_dequantized_product_below_and_above_the_float32_row_threshold(float32_products, rows: int):
    """Few rows go through the int8 kernel (bfloat16 activations), 16+ through float32 products
    of weight slices with the row scales applied: both are the product with the dequantized weight."""
    from petals_like.quant.weights import QuantizedWeight

    generator = torch.Generator().manual_seed(rows)
    weight = QuantizedWeight(torch.randn(50, 64, generator=generator), "int8")
    x, b = torch.randn(2, rows // 2, 64, generator=generator), torch.randn(50, generator=generator)
    with torch.inference_mode():
        got = linear(x, weight, b)
    expected = F.linear(x, weight.dequantize(torch.float32), b)
    assert float32_products == ([] if rows < 16 else [rows])
    tolerance = 1e-5 if rows >= 16 else 2e-2  # the kernel rounds x to bfloat16
    assert got.shape == (2, rows // 2, 50) and got.dtype == torch.float32
    assert float((got - expected).norm() / expected.norm()) < tolerance


@pytest.mark.parametrize("rows", [16, 127, 128, 300])
def test_int4_weights_match_the_kernel_product_below_and_above_the_float32_row_threshold(
    float32_products, int4_unpacked, rows: int
):
    """4-bit weights: up to 127 rows through the 4-bit kernel (bfloat16 activations), from 128 on
    through float32 products of weight slices unpacked from the kernel's layout (here 2 slices of
    32 rows): both are the product with the weight the kernel holds."""
    from petals_like.quant.weights import QuantizedWeight

    generator = torch.Generator().manual_seed(rows)
    weight = QuantizedWeight(torch.randn(64, 128, generator=generator), "int4")
    assert weight.unpacks_to_float32 and linear_module._slice_rows(64, 128, weight.row_multiple) == 32
    x, b = torch.randn(rows, 1, 128, generator=generator), torch.randn(64, generator=generator)
    with torch.inference_mode():
        got = linear(x, weight, b)
    assert float32_products == ([] if rows < 128 else [rows])
    assert got.shape == (rows, 1, 64) and got.dtype == torch.float32
    # against the kernel's own weight (bfloat16-rounded: up to 2^-9 of each value), and, for the
    # float32 path, exactly against the whole dequantized weight (slicing and bias)
    expected = F.linear(x, weight.kernel_weight(), b)
    assert float((got - expected).norm() / expected.norm()) < (4e-3 if rows >= 128 else 2e-2)
    if rows >= 128:
        exact = F.linear(x, weight.dequantize(torch.float32), b)
        assert float((got - exact).norm() / exact.norm()) < 1e-5


def test_int4_slices_need_not_divide_the_blocks_evenly(float32_products, int4_unpacked, monkeypatch):
    """224 rows = 7 blocks of 32, in slices of at most 4 blocks: 128 + 96 rows."""
    from petals_like.quant.weights import QuantizedWeight

    monkeypatch.setattr(linear_module, "_UPCAST_SLICE_BYTES", 112 * 128 * 4)
    generator = torch.Generator().manual_seed(4)
    weight = QuantizedWeight(torch.randn(224, 128, generator=generator), "int4")
    assert linear_module._slice_rows(224, 128, weight.row_multiple) == 128
    x = torch.randn(130, 128, generator=generator)
    with torch.inference_mode():
        got = linear(x, weight)
    expected = F.linear(x, weight.kernel_weight())
    assert float32_products == [130] and float((got - expected).norm() / expected.norm()) < 4e-3


def test_int4_weights_stay_on_the_kernel_where_the_rows_or_the_layout_do_not_fit(float32_products, int4_kernel, monkeypatch):
    """The kernel packs output rows in blocks of 32: a weight with 48 rows is not unpacked, nor is
    any weight where this torch's layout is not the one read; products and the dequantized weight
    then come from the kernel."""
    from petals_like.quant import weights

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(130, 128, generator=generator)
    for rows, layout_known in ((48, True), (64, False)):
        monkeypatch.setattr(weights, "_int4_layout_ok", layout_known)
        w = torch.randn(rows, 128, generator=generator)
        weight = weights.QuantizedWeight(w, "int4")
        with torch.inference_mode():
            got = linear(x, weight)
        assert weight.kernel_layout and not weight.unpacks_to_float32 and float32_products == []
        assert torch.equal(weight.dequantize(), weight.kernel_weight())
        from_kernel = F.linear(x, weight.kernel_weight())
        assert float((got - from_kernel).norm() / from_kernel.norm()) < 2e-2  # x rounded to bfloat16
        assert float((got - F.linear(x, w)).norm() / F.linear(x, w).norm()) < 0.11


def test_float32_slices_of_quantized_weights_keep_their_row_multiple(monkeypatch):
    monkeypatch.setattr(linear_module, "_UPCAST_SLICE_BYTES", 40 * 64 * 4)
    assert linear_module._slice_rows(128, 64, 32) == 32  # 40 rows fit: 4 slices of 32
    assert linear_module._slice_rows(96, 64, 32) == 32
    assert linear_module._slice_rows(64, 1024, 32) == 32  # not even 32 rows fit: one block a slice
    with pytest.raises(ValueError):
        linear_module._slice_rows(48, 64, 32)


def test_the_few_row_form_is_measured_once_or_set(monkeypatch):
    monkeypatch.setattr(linear_module, "_swapped_ok", None)
    monkeypatch.setenv("PETALS_LIKE_SWAPPED_LINEAR", "1")
    assert linear_module._prefer_swapped() is True
    monkeypatch.setattr(linear_module, "_swapped_ok", None)
    monkeypatch.setenv("PETALS_LIKE_SWAPPED_LINEAR", "0")
    assert linear_module._prefer_swapped() is False
    monkeypatch.setattr(linear_module, "_swapped_ok", None)
    monkeypatch.delenv("PETALS_LIKE_SWAPPED_LINEAR")
    calls = []
    monkeypatch.setattr(linear_module, "_measure_swapped", lambda: calls.append(1) or True)
    assert linear_module._prefer_swapped() is True and linear_module._prefer_swapped() is True
    assert calls == [1]
