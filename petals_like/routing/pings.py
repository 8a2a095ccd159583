"""PingTable: smoothed round-trip times to peers, measured with a short rpc_info call.

Clients keep one for the servers they may route through; servers keep one for the servers that
can follow their span and announce it (next_pings) so that clients can price server-to-server
hops. A peer that does not answer within the timeout is recorded at the timeout: slow, not gone
(failures are for the ban list to judge). A peer that refuses the call outright (its daemon
cannot be dialled: a crashed server whose records have not expired yet, or a record of a server
that never existed) is recorded the same way and also listed in `unreachable`, so that a client
pings it again before routing through it. Both kinds are in `unanswered`: clients plan around
them while anything else covers their blocks (routing/manager.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Iterable, Optional

from hivemind.p2p import P2P

from petals_like.wire import call_info

EMA = 0.3  # weight of the newest sample


class PingTable:
    def __init__(self, *, timeout: float = 2.0, period: float = 30.0, max_parallel: int = 16):
        self.timeout = timeout
        self.period = period  # a peer measured more recently than this is not measured again
        self.max_parallel = max_parallel
        self.rtts: dict[str, float] = {}
        self.unreachable: set[str] = set()  # peers whose latest ping failed, and not by timing out
        self.unanswered: set[str] = set()  # peers whose latest ping got no answer: unreachable or timed out
        self._measured_at: dict[str, float] = {}
        self.sent = 0  # pings sent so far (what a flood of records for servers that do not exist costs)

    def record(self, peer_id: str, seconds: float) -> None:
        old = self.rtts.get(peer_id)
        self.rtts[peer_id] = seconds if old is None else (1 - EMA) * old + EMA * seconds
        self._measured_at[peer_id] = time.monotonic()

    def forget(self, keep: Iterable[str]) -> None:
        """Drop peers that are no longer in the swarm."""
        keep = set(keep)
        for peer in [p for p in self.rtts if p not in keep]:
            self.rtts.pop(peer, None)
            self._measured_at.pop(peer, None)
        self.unreachable &= keep
        self.unanswered &= keep

    def due(self, peers: Iterable[str]) -> list[str]:
        now = time.monotonic()
        return [p for p in peers if now - self._measured_at.get(p, -float("inf")) >= self.period]

    async def measure(self, p2p: P2P, peers: Iterable[str], *, force: bool = False) -> None:
        """Ping the given peers (only those not measured within `period`, unless forced), in parallel."""
        targets = list(peers) if force else self.due(peers)
        self.sent += len(targets)
        semaphore = asyncio.Semaphore(self.max_parallel)

        async def one(peer: str) -> None:
            async with semaphore:
                started = time.perf_counter()
                try:
                    await call_info(p2p, peer, timeout=self.timeout)
                    elapsed: Optional[float] = time.perf_counter() - started
                    self.unreachable.discard(peer)
                    self.unanswered.discard(peer)
                except asyncio.TimeoutError:
                    elapsed = self.timeout
                    self.unanswered.add(peer)
                except Exception:
                    elapsed = self.timeout
                    self.unreachable.add(peer)
                    self.unanswered.add(peer)
                self.record(peer, elapsed)

        await asyncio.gather(*(one(peer) for peer in targets))

    def snapshot(self, peers: Iterable[str]) -> dict[str, float]:
        return {p: round(self.rtts[p], 6) for p in peers if p in self.rtts}
