"""HeadBatcher: one LM-head pass for the concurrent generate() calls of one client process.

The LM head is the client's largest matrix (vocab x hidden: 131 MB for 32000 x 1024 in float32);
reading it costs ~10 ms per token on a CPU. When many sessions of one process generate at once
(a chat service, a benchmark), computing their next-token logits together reads it once per round
instead of once per session. The first caller of a round leads: it waits for the other sessions
in progress, computes all logits in one matmul, and hands each caller its rows. A lone session
never waits.

How long the leader waits (phase alignment): every session's arrivals are timed, giving its
period (one step through the servers plus the head, smoothed). A missing session whose period is
about the leader's own is just out of phase, e.g. the other half of sessions that split into two
groups taking turns on the servers; its next arrival is predictable, and the leader waits for it
(up to `max_wait`). The merged round then travels through the servers as one batch, and they
stay merged: each server runs one iteration per round instead of one per group, which on a
server that shares its cores does the same work in about half the time. A session that is late
(past its predicted arrival) or slower (a longer period: a slower route, a replay after a
fail-over) is not waited for beyond `window`, so it never sets everyone's pace.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Hashable, Optional

import torch

_EMA = 0.3  # weight of the newest interval in a session's smoothed period
_SAME_PACE = 1.5  # a missing session is "out of phase" (worth waiting for) if its period <= this x the leader's
_SLACK = 1.25  # predicted arrival = last arrival + period x this


class _Request:
    __slots__ = ("hidden", "logits", "error", "key")

    def __init__(self, hidden: torch.Tensor, key: Optional[Hashable]):
        self.hidden = hidden
        self.key = key
        self.logits: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None


class _Pace:
    __slots__ = ("last", "period")

    def __init__(self) -> None:
        self.last: Optional[float] = None  # time of the latest arrival
        self.period: Optional[float] = None  # smoothed time between arrivals

    def arrive(self, now: float) -> None:
        if self.last is not None:
            interval = now - self.last
            self.period = interval if self.period is None else (1 - _EMA) * self.period + _EMA * interval
        self.last = now


class HeadBatcher:
    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], window: float = 0.005,
                 max_wait: float = 0.5):  # fmt: skip
        self.logits_fn = logits_fn  # [rows, hidden] -> [rows, vocab]
        self.window = window  # how long a leader always waits for the other sessions
        self.max_wait = max_wait  # how long it may wait for an out-of-phase session (see the module docstring)
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._leading = False
        self._paces: dict[Hashable, _Pace] = {}  # sessions in progress that identified themselves
        self.active = 0  # generate() calls in progress; a round waits for at most this many
        self.rounds = 0  # head passes (a counter for tests and benchmarks)

    def session_started(self, key: Optional[Hashable] = None) -> None:
        """A generate() call begins; `key` (any hashable, unique per call) lets its arrivals be timed."""
        with self._cond:
            self.active += 1
            if key is not None:
                self._paces[key] = _Pace()

    def session_ended(self, key: Optional[Hashable] = None) -> None:
        with self._cond:
            self.active -= 1
            self._paces.pop(key, None)
            self._cond.notify_all()  # a leader waiting for this session must not wait in vain

    def __call__(self, hidden: torch.Tensor, key: Optional[Hashable] = None) -> torch.Tensor:
        """hidden [batch, hidden] -> logits [batch, vocab], computed together with concurrent callers."""
        request = _Request(hidden, key)
        with self._cond:
            arrived = time.monotonic()
            pace = self._paces.get(key)
            if pace is not None:
                pace.arrive(arrived)
            self._pending.append(request)
            lead = not self._leading
            if lead:
                self._leading = True
                while len(self._pending) < self.active:
                    left = self._deadline(arrived, pace) - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._pending, self._leading = self._pending, [], False
            else:
                self._cond.notify_all()  # the leader counts arrivals
                while request.logits is None and request.error is None:
                    self._cond.wait()
        if not lead:
            if request.error is not None:
                raise request.error
            return request.logits
        try:
            rows = [r.hidden.shape[0] for r in batch]
            logits = self.logits_fn(torch.cat([r.hidden for r in batch]))
            for r, part in zip(batch, logits.split(rows)):
                r.logits = part
        except BaseException as e:
            for r in batch:
                r.error = e
        with self._cond:
            self.rounds += 1
            self._cond.notify_all()
        if request.error is not None:
            raise request.error
        return request.logits

    def _deadline(self, arrived: float, leader: Optional[_Pace]) -> float:
        """Until when the leader waits: `window`, or the predicted arrival of out-of-phase sessions."""
        deadline = arrived + self.window
        if leader is None or leader.period is None:
            return deadline
        here = {r.key for r in self._pending}
        now = time.monotonic()
        for key, pace in self._paces.items():
            if key in here or pace.period is None or pace.period > _SAME_PACE * leader.period:
                continue
            expected = pace.last + _SLACK * pace.period
            if now <= expected <= arrived + self.max_wait:
                deadline = max(deadline, expected)
        return deadline
