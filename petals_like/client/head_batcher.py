"""HeadBatcher: one LM-head pass for the concurrent generate() calls of one client process.

Why: the LM head is the client's largest matrix, so the sessions of a round share one pass over it; and
sessions kept in phase (the leader waits for those just out of phase, and sessions that start together
send their prompts together) reach the servers as one batch. How it waits, and what it gains:
docs/benchmarks.md, "Client head batcher".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from typing import Callable, Collection, Hashable, Mapping, Optional

import torch

from petals_like.utils.threads import use_threads

_EMA = 0.3  # weight of the newest interval in a session's smoothed period
_SAME_PACE = 1.5  # a missing session is "out of phase" (worth waiting for) if its period <= this x the leader's
_SLACK = 1.25  # predicted arrival = last arrival + period x this


class _Request:
    __slots__ = ("hidden", "key", "future")

    def __init__(self, hidden: torch.Tensor, key: Optional[Hashable], future: asyncio.Future):
        self.hidden = hidden
        self.key = key
        self.future = future


class Pace:
    """When one session's steps reach the head."""

    __slots__ = ("last", "period", "interval")

    def __init__(self, last: Optional[float] = None, period: Optional[float] = None, interval: Optional[float] = None):
        self.last = last  # time of the latest arrival
        self.period = period  # smoothed time between arrivals
        self.interval = interval  # the latest time between arrivals, unsmoothed

    def arrive(self, now: float) -> None:
        if self.last is not None:
            self.interval = now - self.last
            self.period = self.interval if self.period is None else (1 - _EMA) * self.period + _EMA * self.interval
        self.last = now


class HeadBatcher:
    """Used from one event loop only (the client node's); nothing here is thread-safe, nothing needs to be."""

    def __init__(
        self,
        logits_fn: Callable[[torch.Tensor], torch.Tensor],
        window: float = 0.005,
        max_wait: float = 0.5,
        *,
        clock: Callable[[], float] = time.monotonic,
        executor: Optional[concurrent.futures.Executor] = None,
    ):
        """clock: the time of the event loop the batcher runs on, in seconds (its waits are that loop's
        asyncio.sleep and wait_for); time.monotonic is asyncio's. Tests pass the clock of a loop with
        virtual time. executor: where head passes run; by default one worker thread, so that the loop
        goes on reading answers meanwhile."""
        self.logits_fn = logits_fn  # [rows, hidden] -> [rows, vocab]
        self.clock = clock
        self.window = window  # how long a leader always waits for the other sessions
        self.max_wait = max_wait  # how long it may wait for an out-of-phase session (docs/benchmarks.md, "Client head batcher")
        self._pending: list[_Request] = []
        self._leader: Optional[asyncio.Task] = None  # gathering the current round
        self._changed: Optional[asyncio.Event] = None  # an arrival or a departure: the leader recounts
        self._paces: dict[Hashable, Pace] = {}  # sessions in progress that identified themselves
        if executor is None:
            executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lm-head", initializer=use_threads)
        self._executor = executor
        self._starting: set[Hashable] = set()  # sessions whose chain is not open yet (see first_step)
        self._all_open = asyncio.Event()  # set while no session is opening
        self._all_open.set()
        self._last_start = float("-inf")  # when the latest opening session started
        self.start_quiet = 0.03  # how long no session may start before a waiting first step goes
        self.first_window = 0.1  # how long a first round waits for the other sessions' first answers
        self.active = 0  # generate() calls in progress; a round waits for at most this many
        self.rounds = 0  # head passes (a counter for tests and benchmarks)
        self.last_pass_s = 0.0  # seconds of the latest head pass (bench (t)'s timeline)

    def session_started(self, key: Optional[Hashable] = None, *, opening: bool = False) -> None:
        """A generate() call begins; `key` (any hashable, unique per call) lets its arrivals be timed.
        opening: its session has no chain yet and will call first_step() once it has one."""
        self.active += 1
        if key is not None:
            self._paces[key] = Pace()
            if opening:
                self._starting.add(key)
                self._all_open.clear()
                self._last_start = self.clock()

    def session_ended(self, key: Optional[Hashable] = None) -> None:
        self.active -= 1
        self._paces.pop(key, None)
        self._opened(key)  # sessions waiting for this one to open must not wait in vain
        if self._changed is not None:
            self._changed.set()  # a leader waiting for this session must not wait in vain

    async def first_step(self, key: Hashable) -> None:
        """Called by a session whose chain just opened, before it sends its prompt: waits until every
        session that is still opening has opened too (at most max_wait), so that the prompts reach
        the servers together."""
        self._opened(key)
        deadline = self.clock() + self.max_wait
        while True:
            now = self.clock()
            quiet_at = self._last_start + self.start_quiet
            if now >= deadline or (not self._starting and now >= quiet_at):
                return
            if self._starting:  # until the last opening session opens (or ends)
                try:
                    await asyncio.wait_for(self._all_open.wait(), deadline - now)
                except asyncio.TimeoutError:
                    pass
            else:
                await asyncio.sleep(min(quiet_at, deadline) - now)

    def _opened(self, key: Optional[Hashable]) -> None:
        self._starting.discard(key)
        if not self._starting:
            self._all_open.set()

    async def __call__(self, hidden: torch.Tensor, key: Optional[Hashable] = None) -> torch.Tensor:
        """hidden [batch, hidden] -> logits [batch, vocab], computed together with concurrent callers."""
        loop = asyncio.get_running_loop()
        arrived = self.clock()
        pace = self._paces.get(key)
        if pace is not None:
            pace.arrive(arrived)
        request = _Request(hidden, key, loop.create_future())
        self._pending.append(request)
        if self._leader is None:
            self._changed = asyncio.Event()
            self._leader = asyncio.ensure_future(self._lead(arrived, pace))
        else:
            self._changed.set()
        return await request.future

    async def _lead(self, arrived: float, pace: Optional[Pace]) -> None:
        """Gather one round, then compute it off the loop; the next arrival starts the next round."""
        batch: list[_Request] = []
        try:
            while len(self._pending) < self.active:
                left = self._deadline(arrived, pace) - self.clock()
                if left <= 0:
                    break
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except asyncio.TimeoutError:
                    pass
            batch, self._pending, self._leader = self._pending, [], None
            rows = [r.hidden.shape[0] for r in batch]
            joined = torch.cat([r.hidden for r in batch])
            logits = await asyncio.get_running_loop().run_in_executor(self._executor, self._compute, joined)
            self.rounds += 1
            for r, part in zip(batch, logits.split(rows)):
                if not r.future.done():
                    r.future.set_result(part)
        except BaseException as e:
            if self._leader is asyncio.current_task():  # failed while gathering
                batch, self._pending, self._leader = self._pending, [], None
            error = e if isinstance(e, Exception) else RuntimeError("the LM head round was cancelled")
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(error)
            if not isinstance(e, Exception):
                raise

    def _compute(self, hidden: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        with torch.inference_mode():
            logits = self.logits_fn(hidden)
        self.last_pass_s = time.perf_counter() - started
        return logits

    def close(self) -> None:
        self._executor.shutdown(wait=False)

    def _deadline(self, arrived: float, leader: Optional[Pace]) -> float:
        """Until when the leader waits: `window`, or the predicted arrival of out-of-phase sessions."""
        deadline = arrived + self.window
        here = {r.key for r in self._pending}
        if leader is not None and leader.period is None:
            # the leader's first round: sessions that sent their prompts with it (see first_step) get
            # their answers over a few tens of ms (a prompt's output is large): wait for them too
            if any(p.last is None and k not in here and k not in self._starting for k, p in self._paces.items()):
                deadline = max(deadline, arrived + self.first_window)
            return deadline
        if leader is None:
            return deadline
        return max(deadline, cohort_deadline(leader, self._paces, here, arrived, self.clock(), self.max_wait))


def cohort_deadline(
    leader: Pace, paces: Mapping[Hashable, Pace], present: Collection[Hashable], arrived: float, now: float, max_wait: float
) -> float:
    """The latest predicted arrival, at most max_wait after the leader arrived, of the sessions
    missing from the round (not in `present`) that run at about the leader's pace; -inf if none.

    A session far slower than the leader never sets the pace, and one already overdue is a
    straggler, not waited for."""
    deadline = -math.inf
    # a round that took the leader longer than usual (a busy moment of the machine) delays the
    # sessions that travelled with it alike: expect them after as long, not after their usual period
    this_round = leader.interval or 0.0
    for key, pace in paces.items():
        if key in present or pace.period is None or leader.period is None or pace.period > _SAME_PACE * leader.period:
            continue
        expected = pace.last + _SLACK * max(pace.period, this_round)
        if now <= expected <= arrived + max_wait:
            deadline = max(deadline, expected)
    return deadline
