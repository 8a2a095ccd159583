"""linear(): the inference matmul equals F.linear, and autograd still works through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def test_bfloat16_goes_through_f_linear():
    x, w = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(linear(x, w), F.linear(x, w))


def test_many_rows_go_through_f_linear():
    """oneDNN keeps a compiled kernel per row count; above a handful of rows, where it gains nothing,
    F.linear runs instead, so a server's memory does not grow with every batch size it meets."""
    x, w = torch.randn(33, 32), torch.randn(16, 32)
    with torch.inference_mode():
        assert torch.equal(linear(x, w), F.linear(x, w))
