"""HeadBatcher: concurrent generate() coroutines share one head pass and each gets its own rows."""

from __future__ import annotations

import asyncio
import time

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
    for _ in inputs:
        batcher.session_started()

    async def main() -> list[torch.Tensor]:
        async def one(i: int) -> torch.Tensor:
            await asyncio.sleep(0.01 * i)  # arrivals spread over 30 ms
            return await batcher(inputs[i])

        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), 10)

    results = asyncio.run(main())
    batcher.close()
    assert calls == [10] and batcher.rounds == 1
    for x, y in zip(inputs, results):
        assert torch.allclose(y, x @ weight.T, atol=1e-5)


def test_a_lone_session_does_not_wait_and_errors_reach_every_caller():
    batcher = HeadBatcher(lambda h: h * 2, window=5.0)

    async def lone() -> tuple[torch.Tensor, float]:
        batcher.session_started()
        started = time.monotonic()
        out = await batcher(torch.ones(1, 3))
        batcher.session_ended()
        return out, time.monotonic() - started

    out, waited = asyncio.run(lone())
    assert torch.equal(out, torch.full((1, 3), 2.0)) and waited < 2.0  # not the 5 s window

    def boom(h):
        raise RuntimeError("head failed")

    failing = HeadBatcher(boom, window=5.0)

    async def two() -> list:
        for _ in range(2):
            failing.session_started()
        return await asyncio.gather(failing(torch.ones(1, 3)), failing(torch.ones(2, 3)), return_exceptions=True)

    errors = asyncio.run(two())
    assert [str(e) for e in errors] == ["head failed", "head failed"]
    batcher.close()
    failing.close()


def test_a_departing_session_ends_the_wait():
    """A leader waiting for a session that finishes instead of arriving computes at once."""
    batcher = HeadBatcher(lambda h: h, window=5.0)

    async def main() -> float:
        batcher.session_started("a")
        batcher.session_started("b")
        started = time.monotonic()
        waiting = asyncio.ensure_future(batcher(torch.ones(1, 2), "a"))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # still waiting for "b"
        batcher.session_ended("b")
        await asyncio.wait_for(waiting, 2)
        return time.monotonic() - started

    assert asyncio.run(main()) < 2.0
    batcher.close()


def _pace(last: float, period: float):
    from petals_like.client.head_batcher import _Pace

    pace = _Pace()
    pace.last, pace.period = last, period
    return pace


def test_leader_waits_for_out_of_phase_sessions_only():
    from petals_like.client.head_batcher import _Request

    batcher = HeadBatcher(lambda h: h, window=0.005, max_wait=0.5)
    batcher._pending = [_Request(torch.ones(1, 2), "leader", None)]  # the leader's own request is in the round
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
    batcher.close()


def test_a_slow_round_delays_the_expected_arrival_of_the_leaders_cohort():
    """The machine was busy: the leader's last round took 0.3 s against its usual 0.2 s. A session
    that arrived together with the leader last time is expected as much later, not dropped as overdue."""
    from petals_like.client.head_batcher import _Request

    batcher = HeadBatcher(lambda h: h, window=0.005, max_wait=0.5)
    batcher._pending = [_Request(torch.ones(1, 2), "leader", None)]
    now = time.monotonic()
    leader = _pace(now, 0.2)
    leader.interval = 0.3
    batcher._paces = {"leader": leader, "cohort": _pace(now - 0.3, 0.2)}
    assert abs(batcher._deadline(now, leader) - (now - 0.3 + 1.25 * 0.3)) < 1e-6
    leader.interval = 0.2  # an ordinary round: the same session is overdue (expected at now - 0.05)
    assert batcher._deadline(now, leader) == now + 0.005
    batcher.close()


def test_two_groups_taking_turns_merge_into_one_round():
    """Two sessions with the same period, half a period apart, end up sharing head passes."""
    rows: list[int] = []
    batcher = HeadBatcher(lambda h: rows.append(h.shape[0]) or h, window=0.005, max_wait=0.5)

    async def run(key: str, delay: float) -> None:
        batcher.session_started(key)
        try:
            await asyncio.sleep(delay)
            for _ in range(10):
                await batcher(torch.ones(1, 4), key)
                await asyncio.sleep(0.1)  # the "servers"
        finally:
            batcher.session_ended(key)

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(run("a", 0.0), run("b", 0.05)), 30)

    asyncio.run(main())
    batcher.close()
    assert sum(rows) == 20
    assert rows.count(2) >= 5, rows  # without phase alignment every round would hold one row


def test_a_cancelled_round_fails_its_callers_instead_of_hanging():
    batcher = HeadBatcher(lambda h: h, window=5.0)

    async def main() -> BaseException:
        batcher.session_started()
        batcher.session_started()  # a second session that never arrives: the leader waits
        caller = asyncio.ensure_future(batcher(torch.ones(1, 2)))
        await asyncio.sleep(0.05)
        batcher._leader.cancel()
        done, _ = await asyncio.wait({caller}, timeout=2)
        assert done, "the caller hangs"
        return caller.exception()

    error = asyncio.run(main())
    batcher.close()
    assert isinstance(error, RuntimeError) and "cancelled" in str(error)


def test_sessions_that_start_together_send_their_first_step_together():
    """first_step holds a session whose chain opened until the others starting with it have opened."""
    batcher = HeadBatcher(lambda h: h, window=0.005, max_wait=2.0)
    batcher.start_quiet = 0.0
    released: dict[str, float] = {}

    async def session(key: str, open_delay: float) -> None:
        batcher.session_started(key, opening=True)
        try:
            await asyncio.sleep(open_delay)  # opening its chain
            await batcher.first_step(key)
            released[key] = time.monotonic()
        finally:
            batcher.session_ended(key)

    async def main() -> float:
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(session("fast", 0.0), session("slow", 0.3)), 5)
        return started

    started = asyncio.run(main())
    batcher.close()
    assert released["fast"] - started >= 0.29  # waited for the slow one's chain
    assert abs(released["fast"] - released["slow"]) < 0.1


def test_first_step_waits_at_most_max_wait_and_not_for_a_session_that_ends():
    batcher = HeadBatcher(lambda h: h, window=0.005, max_wait=0.2)
    batcher.start_quiet = 0.0

    async def main() -> tuple[float, float]:
        batcher.session_started("a", opening=True)
        batcher.session_started("never_opens", opening=True)
        started = time.monotonic()
        await batcher.first_step("a")  # "never_opens" never opens: max_wait
        capped = time.monotonic() - started
        batcher.session_ended("never_opens")
        batcher.session_started("b", opening=True)
        batcher.session_started("fails", opening=True)
        started = time.monotonic()
        waiting = asyncio.ensure_future(batcher.first_step("b"))
        await asyncio.sleep(0.02)
        batcher.session_ended("fails")  # its chain could not open: "b" goes at once
        await asyncio.wait_for(waiting, 1)
        return capped, time.monotonic() - started

    capped, released = asyncio.run(main())
    batcher.close()
    assert 0.15 <= capped < 1.0
    assert released < 0.15


def test_a_first_round_waits_for_the_first_answers_of_its_cohort():
    """Prompt outputs arrive spread over tens of ms; the first head round waits for them, later
    rounds of a session with a known pace do not wait for a newcomer."""
    rows: list[int] = []
    batcher = HeadBatcher(lambda h: rows.append(h.shape[0]) or h, window=0.005, max_wait=0.5)

    async def cohort() -> None:
        for key in ("a", "b"):
            batcher.session_started(key)

        async def late_b() -> None:
            await asyncio.sleep(0.04)
            await batcher(torch.ones(1, 2), "b")

        # "b" arrives 40 ms after "a", well past the 5 ms window: still one round of two rows
        await asyncio.wait_for(asyncio.gather(batcher(torch.ones(1, 2), "a"), late_b()), 5)

    asyncio.run(cohort())
    batcher.close()
    assert rows == [2]
