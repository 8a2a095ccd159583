"""HeadBatcher: concurrent generate() coroutines share one head pass and each gets its own rows.

The batcher's waits are driven in virtual time: each test runs on an event loop whose clock jumps
to the next timer whenever the loop would wait, and head passes run inline. So the tests assert
when things happen (at 0.3 s, not "at least 0.29 s") and what each round holds, the same on every
machine, without waiting for real.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import selectors
from typing import Any, Awaitable, Callable

import pytest
import torch

from petals_like.client.head_batcher import HeadBatcher, Pace, cohort_deadline


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _VirtualSelector(selectors.DefaultSelector):
    """Never blocks: with nothing ready, the clock advances by the time the loop would have waited."""

    def __init__(self, clock: VirtualClock):
        super().__init__()
        self.clock = clock

    def select(self, timeout=None):
        events = super().select(0)
        if not events and timeout is None:
            raise RuntimeError("deadlock: no timer is due and nothing can wake the loop")
        if not events and timeout > 0:
            self.clock.now += timeout
        return events


class _VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock):
        super().__init__(_VirtualSelector(clock))
        self._virtual = clock

    def time(self) -> float:
        return self._virtual.now


class _Inline(concurrent.futures.Executor):
    """Runs the head pass on the loop's thread, so that it takes no time, virtual or real."""

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)
        return future


def virtual(logits_fn: Callable[[torch.Tensor], torch.Tensor], **kwargs) -> tuple[HeadBatcher, VirtualClock]:
    clock = VirtualClock()
    return HeadBatcher(logits_fn, clock=clock, executor=_Inline(), **kwargs), clock


def run(clock: VirtualClock, main: Callable[[], Awaitable[Any]]) -> Any:
    with asyncio.Runner(loop_factory=lambda: _VirtualLoop(clock)) as runner:
        return runner.run(main())


async def until(clock: VirtualClock, t: float) -> None:
    await asyncio.sleep(max(0.0, t - clock()))


def test_concurrent_callers_share_a_round_and_get_their_rows():
    weight = torch.randn(50, 8)
    calls: list[int] = []

    def head(h: torch.Tensor) -> torch.Tensor:
        calls.append(h.shape[0])
        return h @ weight.T

    batcher, clock = virtual(head, window=5.0)  # only the arrival of all 4 callers ends the wait
    inputs = [torch.randn(i + 1, 8) for i in range(4)]
    for _ in inputs:
        batcher.session_started()

    async def main() -> list[tuple[torch.Tensor, float]]:
        async def one(i: int) -> tuple[torch.Tensor, float]:
            await asyncio.sleep(0.01 * i)  # arrivals spread over 30 ms
            return await batcher(inputs[i]), clock()

        return await asyncio.gather(*(one(i) for i in range(4)))

    results = run(clock, main)
    batcher.close()
    assert calls == [10] and batcher.rounds == 1
    for x, (y, answered) in zip(inputs, results):
        assert torch.allclose(y, x @ weight.T, atol=1e-5)
        assert answered == pytest.approx(0.03)  # when the last caller arrived, not after the 5 s window


def test_a_lone_session_does_not_wait_and_errors_reach_every_caller():
    batcher, clock = virtual(lambda h: h * 2, window=5.0)

    async def lone() -> torch.Tensor:
        batcher.session_started()
        out = await batcher(torch.ones(1, 3))
        batcher.session_ended()
        return out

    out = run(clock, lone)
    assert torch.equal(out, torch.full((1, 3), 2.0)) and clock() == 0  # not the 5 s window: no wait at all

    def boom(h):
        raise RuntimeError("head failed")

    failing, clock = virtual(boom, window=5.0)

    async def two() -> list:
        for _ in range(2):
            failing.session_started()
        return await asyncio.gather(failing(torch.ones(1, 3)), failing(torch.ones(2, 3)), return_exceptions=True)

    errors = run(clock, two)
    assert [str(e) for e in errors] == ["head failed", "head failed"]
    batcher.close()
    failing.close()


def test_a_departing_session_ends_the_wait():
    """A leader waiting for a session that finishes instead of arriving computes at once."""
    batcher, clock = virtual(lambda h: h, window=5.0)

    async def main() -> float:
        batcher.session_started("a")
        batcher.session_started("b")
        waiting = asyncio.ensure_future(batcher(torch.ones(1, 2), "a"))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # still waiting for "b"
        batcher.session_ended("b")
        await waiting
        return clock()

    assert run(clock, main) == pytest.approx(0.05)  # when "b" ended, not after the 5 s window
    batcher.close()


def test_leader_waits_for_out_of_phase_sessions_only():
    now = 100.0
    leader = Pace(now, 0.2)
    paces = {
        "leader": leader,
        "half_a_period_behind": Pace(now - 0.1, 0.2),  # expected at now + 0.15: wait for it
        "slower": Pace(now - 0.1, 0.6),  # a longer period: never sets the pace
        "overdue": Pace(now - 0.5, 0.2),  # expected 0.25 s ago: a straggler
        "far_ahead": Pace(now - 0.01, 0.4),  # at the same pace, but expected after max_wait
    }
    present = {"leader"}  # the leader's own request is in the round
    assert cohort_deadline(leader, paces, present, now, now, max_wait=0.5) == pytest.approx(now - 0.1 + 1.25 * 0.2)
    assert cohort_deadline(leader, paces, present | {"half_a_period_behind"}, now, now, 0.5) == -math.inf
    del paces["half_a_period_behind"]
    assert cohort_deadline(leader, paces, present, now, now, 0.5) == -math.inf  # nobody worth waiting for
    assert cohort_deadline(Pace(now), paces, present, now, now, 0.5) == -math.inf  # the leader's pace is unknown yet


def test_a_slow_round_delays_the_expected_arrival_of_the_leaders_cohort():
    """The machine was busy: the leader's last round took 0.3 s against its usual 0.2 s. A session
    that arrived together with the leader last time is expected as much later, not dropped as overdue."""
    now = 100.0
    leader = Pace(now, 0.2, interval=0.3)
    paces = {"leader": leader, "cohort": Pace(now - 0.3, 0.2)}
    assert cohort_deadline(leader, paces, {"leader"}, now, now, 0.5) == pytest.approx(now - 0.3 + 1.25 * 0.3)
    leader.interval = 0.2  # an ordinary round: the same session is overdue (expected at now - 0.05)
    assert cohort_deadline(leader, paces, {"leader"}, now, now, 0.5) == -math.inf


def test_the_leader_waits_the_short_window_or_its_cohort_whichever_is_later():
    """Through the batcher: a session that runs at the leader's pace half a period behind holds the
    leader's head pass until it is expected; without it the leader waits only `window`."""
    rows: list[int] = []
    batcher, clock = virtual(lambda h: rows.append(h.shape[0]) or h, window=0.005, max_wait=0.5)

    async def main():
        for key in ("a", "b"):
            batcher.session_started(key)
        # a and b each arrive every 0.2 s, b 0.1 s after a (two rounds to learn their periods)
        for start in (0.0, 0.2):
            await until(clock, start)
            await batcher(torch.ones(1, 2), "a")
            await until(clock, start + 0.1)
            await batcher(torch.ones(1, 2), "b")
        await until(clock, 0.4)
        a = asyncio.ensure_future(batcher(torch.ones(1, 2), "a"))
        await until(clock, 0.45)
        b = asyncio.ensure_future(batcher(torch.ones(1, 2), "b"))
        await asyncio.gather(a, b)
        return clock()

    assert run(clock, main) <= 0.5
    assert rows[-1] == 2  # the third round of a waited for b and they shared a head pass
    batcher.close()


def test_two_groups_taking_turns_merge_into_one_round():
    """Two sessions with the same period, half a period apart, end up sharing head passes."""
    rows: list[int] = []
    batcher, clock = virtual(lambda h: rows.append(h.shape[0]) or h, window=0.005, max_wait=0.5)
    batcher.first_window = 0.0  # the first round goes alone: the merge is phase alignment's doing

    async def session(key: str, delay: float) -> None:
        batcher.session_started(key)
        try:
            await asyncio.sleep(delay)
            for _ in range(10):
                await batcher(torch.ones(1, 4), key)
                await asyncio.sleep(0.1)  # the "servers"
        finally:
            batcher.session_ended(key)

    async def main() -> None:
        await asyncio.gather(session("a", 0.0), session("b", 0.05))

    run(clock, main)
    batcher.close()
    # a at 0, b at 0.05 and a at 0.1 go alone (no period known yet); b at 0.15 knows both periods
    # and waits for a, due at 0.2; from then on they share every round, where without phase
    # alignment every round would hold one row; b's 10th step (at 1.0) is left alone
    assert rows == [1, 1, 1] + [2] * 8 + [1], rows


def test_a_cancelled_round_fails_its_callers_instead_of_hanging():
    batcher, clock = virtual(lambda h: h, window=5.0)

    async def main() -> BaseException:
        batcher.session_started()
        batcher.session_started()  # a second session that never arrives: the leader waits
        caller = asyncio.ensure_future(batcher(torch.ones(1, 2)))
        await asyncio.sleep(0.05)
        batcher._leader.cancel()
        done, _ = await asyncio.wait({caller}, timeout=2)
        assert done, "the caller hangs"
        return caller.exception()

    error = run(clock, main)
    batcher.close()
    assert isinstance(error, RuntimeError) and "cancelled" in str(error)
    assert clock() == pytest.approx(0.05)  # failed when cancelled, not at a timeout


def test_sessions_that_start_together_send_their_first_step_together():
    """first_step holds a session whose chain opened until the others starting with it have opened."""
    batcher, clock = virtual(lambda h: h, window=0.005, max_wait=2.0)
    batcher.start_quiet = 0.0
    released: dict[str, float] = {}

    async def session(key: str, open_delay: float) -> None:
        batcher.session_started(key, opening=True)
        try:
            await asyncio.sleep(open_delay)  # opening its chain
            await batcher.first_step(key)
            released[key] = clock()
        finally:
            batcher.session_ended(key)

    async def main() -> None:
        await asyncio.gather(session("fast", 0.0), session("slow", 0.3))

    run(clock, main)
    batcher.close()
    # the fast one waited for the slow one's chain, and no longer
    assert released["fast"] == released["slow"] == pytest.approx(0.3)


def test_first_step_waits_at_most_max_wait_and_not_for_a_session_that_ends():
    batcher, clock = virtual(lambda h: h, window=0.005, max_wait=0.2)
    batcher.start_quiet = 0.0

    async def main() -> tuple[float, float]:
        batcher.session_started("a", opening=True)
        batcher.session_started("never_opens", opening=True)
        started = clock()
        await batcher.first_step("a")  # "never_opens" never opens: max_wait
        capped = clock() - started
        batcher.session_ended("never_opens")
        batcher.session_started("b", opening=True)
        batcher.session_started("fails", opening=True)
        started = clock()
        waiting = asyncio.ensure_future(batcher.first_step("b"))
        await asyncio.sleep(0.02)
        batcher.session_ended("fails")  # its chain could not open: "b" goes at once
        await waiting
        return capped, clock() - started

    capped, released = run(clock, main)
    batcher.close()
    assert capped == pytest.approx(0.2)
    assert released == pytest.approx(0.02)


def test_a_first_round_waits_for_the_first_answers_of_its_cohort():
    """Prompt outputs arrive spread over tens of ms; the first head round waits for them, later
    rounds of a session with a known pace do not wait for a newcomer."""
    rows: list[int] = []
    batcher, clock = virtual(lambda h: rows.append(h.shape[0]) or h, window=0.005, max_wait=0.5)

    async def cohort() -> float:
        for key in ("a", "b"):
            batcher.session_started(key)

        async def late_b() -> None:
            await asyncio.sleep(0.04)
            await batcher(torch.ones(1, 2), "b")

        # "b" arrives 40 ms after "a", well past the 5 ms window: still one round of two rows
        await asyncio.gather(batcher(torch.ones(1, 2), "a"), late_b())
        return clock()

    done = run(clock, cohort)
    batcher.close()
    assert rows == [2]
    assert done == pytest.approx(0.04)  # at b's arrival, not at the end of first_window (0.1 s)
