"""HeadBatcher: concurrent callers share one head pass and each gets its own rows."""

from __future__ import annotations

import threading
import time

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


def _pace(last: float, period: float):
    from petals_like.client.head_batcher import _Pace

    pace = _Pace()
    pace.last, pace.period = last, period
    return pace


def test_leader_waits_for_out_of_phase_sessions_only():
    from petals_like.client.head_batcher import _Request

    batcher = HeadBatcher(lambda h: h, window=0.005, max_wait=0.5)
    batcher._pending = [_Request(torch.ones(1, 2), "leader")]  # the leader's own request is in the round
    now = time.monotonic()
    leader = _pace(now, 0.2)
    batcher._paces = {
        "leader": leader,
        "half_a_period_behind": _pace(now - 0.1, 0.2),  # expected at now + 0.15: wait for it
        "slower": _pace(now - 0.1, 0.6),  # a longer period: never sets the pace
        "overdue": _pace(now - 0.5, 0.2),  # expected 0.25 s ago: a straggler
    }
    deadline = batcher._deadline(now, leader)
    assert abs(deadline - (now - 0.1 + 1.25 * 0.2)) < 1e-6
    del batcher._paces["half_a_period_behind"]
    assert batcher._deadline(now, leader) == now + 0.005  # nobody worth waiting for: the short window
    assert batcher._deadline(now, _pace(now, None)) == now + 0.005  # the leader's pace is unknown yet


def test_two_groups_taking_turns_merge_into_one_round():
    """Two sessions with the same period, half a period apart, end up sharing head passes."""
    rows: list[int] = []
    batcher = HeadBatcher(lambda h: rows.append(h.shape[0]) or h, window=0.005, max_wait=0.5)
    keys = ["a", "b"]
    for key in keys:
        batcher.session_started(key)

    def run(key: str, delay: float) -> None:
        time.sleep(delay)
        for _ in range(10):
            batcher(torch.ones(1, 4), key)
            time.sleep(0.1)  # the "servers"
        batcher.session_ended(key)

    threads = [threading.Thread(target=run, args=(key, delay)) for key, delay in zip(keys, (0.0, 0.05))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(rows) == 20
    assert rows.count(2) >= 5, rows  # without phase alignment every round would hold one row
