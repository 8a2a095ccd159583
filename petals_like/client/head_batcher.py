"""HeadBatcher: one LM-head pass for the concurrent generate() calls of one client process.

The LM head is the client's largest matrix (vocab x hidden: 131 MB for 32000 x 1024 in float32);
reading it costs ~10 ms per token on a CPU. When many sessions of one process generate at once
(a chat service, a benchmark), computing their next-token logits together reads it once per round
instead of once per session. The first caller of a round leads: it waits until every generate()
call in progress has asked (or `window` seconds pass), computes all logits in one matmul, and
hands each caller its rows. A lone session never waits.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import torch


class _Request:
    __slots__ = ("hidden", "logits", "error")

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden
        self.logits: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None


class HeadBatcher:
    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], window: float = 0.005):
        self.logits_fn = logits_fn  # [rows, hidden] -> [rows, vocab]
        self.window = window
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._leading = False
        self.active = 0  # generate() calls in progress; a round waits for at most this many
        self.rounds = 0  # head passes (a counter for tests and benchmarks)

    def session_started(self) -> None:
        with self._cond:
            self.active += 1

    def session_ended(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()  # a leader waiting for this session must not wait in vain

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, hidden] -> logits [batch, vocab], computed together with concurrent callers."""
        request = _Request(hidden)
        with self._cond:
            self._pending.append(request)
            lead = not self._leading
            if lead:
                self._leading = True
                deadline = time.monotonic() + self.window
                while len(self._pending) < self.active and time.monotonic() < deadline:
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
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
