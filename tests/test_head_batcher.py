"""HeadBatcher: concurrent callers share one head pass and each gets its own rows."""

from __future__ import annotations

import threading

import pytest
import torch

from petals_like.client.head_batcher import HeadBatcher


def test_concurrent_callers_share_a_round_and_get_their_rows():
    weight = torch.randn(50, 8)
    calls: list[int] = []

    def head(h: torch.Tensor) -> torch.Tensor:
        calls.append(h.shape[0])
        return h @ weight.T

    batcher = HeadBatcher(head, window=5.0)  # only the arrival of all 4 callers ends the wait
    inputs = [torch.randn(i + 1, 8) for i in range(4)]
    results: list = [None] * 4
    for _ in inputs:
        batcher.session_started()

    def run(i: int) -> None:
        results[i] = batcher(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert calls == [10] and batcher.rounds == 1
    for x, y in zip(inputs, results):
        assert torch.allclose(y, x @ weight.T, atol=1e-5)


def test_a_lone_session_does_not_wait_and_errors_reach_every_caller():
    batcher = HeadBatcher(lambda h: h * 2, window=5.0)
    batcher.session_started()
    assert torch.equal(batcher(torch.ones(1, 3)), torch.full((1, 3), 2.0))
    batcher.session_ended()

    def boom(h):
        raise RuntimeError("head failed")

    with pytest.raises(RuntimeError, match="head failed"):
        HeadBatcher(boom)(torch.ones(1, 3))
