"""RouteManager: keeps the client's view of a model's servers fresh and avoids peers that failed.

The view (every server's span and announced numbers) is re-read from the DHT every update_period
seconds and at once after a failure; round trips to the servers are measured after each refresh
(PingTable) and feed the latency model of inference chains (planner.make_route). Forward/backward
chains are drawn at random, weighted by throughput and load (planner.make_training_route).

A peer that fails is banned for ban_timeout seconds, doubling with each consecutive failure, so a
flapping server is tried less and less; a success clears its record.

Records are claims: anyone can announce servers that do not exist (docs/security.md). Every server
in the view is pinged once per ping_period, in parallel, and chains are planned around the ones whose
latest ping got no answer, so a flood of records for servers that do not exist costs one ping each,
not a failed request (and a retry) each. Only where nothing else covers some block are those tried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional, TypeVar

from petals_like.config import ClientConfig
from petals_like.data_structures import RemoteSpanInfo
from petals_like.dht.announce import get_block_infos
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import compute_spans
from petals_like.routing.pings import PingTable
from petals_like.routing.planner import LatencyModel, NoRouteError, make_route, make_training_route, make_training_routes
from petals_like.wire import call_info

logger = logging.getLogger(__name__)
_route_logger = logging.getLogger("petals_like.route")  # show_route's lines

MAX_BAN_REASONS = 1024

T = TypeVar("T")


class RouteManager:
    def __init__(self, node: SwarmNode, dht_prefix: str, num_blocks: int, config: ClientConfig):
        self.node = node
        self.dht_prefix = dht_prefix
        self.num_blocks = num_blocks
        self.config = config
        self.spans: dict[str, RemoteSpanInfo] = {}
        self._updated_at = -float("inf")
        self._failures: dict[str, int] = {}
        self._banned_until: dict[str, float] = {}  # after failures; a success lifts it
        self._distrusted_until: dict[str, float] = {}  # after wrong answers; only time lifts it
        self.ban_reasons: dict[str, str] = {}  # peer -> why it was last avoided (the last MAX_BAN_REASONS peers)
        self._lock = asyncio.Lock()
        self.pings = PingTable(timeout=config.ping_timeout, period=config.ping_period)
        self.last_routes: dict[str, list[RemoteSpanInfo]] = {}  # the latest route of each kind (show())

    def show(self, kind: str, start: int, end: int, route: list[RemoteSpanInfo]) -> None:
        """Print a chain for blocks [start, end) where the user asked (ClientConfig.show_route): on the
        console through the "petals_like.route" logger, whatever the logging set-up; else at debug level."""
        self.last_routes[kind] = list(route)
        shown = self.config.show_route is True or self.config.show_route == kind
        text = " => ".join(f"{span.peer_id[-6:]}[{span.start}:{span.end}]" for span in route)
        if not shown:
            logger.debug(f"{kind} route for blocks {start}:{end}: {text}")
            return
        if _route_logger.level == logging.NOTSET:  # first use: to stderr, whatever the logging set-up
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            _route_logger.addHandler(handler)
            _route_logger.setLevel(logging.INFO)
            _route_logger.propagate = False
        _route_logger.info(f"Route for {kind} (blocks {start}:{end}): {text}")

    async def refresh(self, *, force: bool = False) -> None:
        """Re-read the swarm from the DHT if the view is older than update_period (or when forced)."""
        async with self._lock:
            if not force and time.monotonic() - self._updated_at < self.config.update_period:
                return
            # bounded, as every read of what strangers serve should be: the lock waits on it
            infos = await asyncio.wait_for(
                get_block_infos(self.node.dht, self.dht_prefix, range(self.num_blocks), num_blocks=self.num_blocks),
                self.config.connect_timeout,
            )
            self.spans = {peer: span for peer, span in compute_spans(infos).items() if self._may_use(peer)}
            for peer, span in self.spans.items():  # how to reach each: directly, or through its relays
                self.node.routes.learn(peer, span.server_info.addrs, span.server_info.using_relay)
            self._updated_at = time.monotonic()
            self.pings.forget(self.spans)
            await self.pings.measure(self.node.p2p, self.spans)

    def _may_use(self, peer_id: str) -> bool:
        """The user's own choice of servers (allowed_servers, blocked_servers): others are not even pinged."""
        allowed, blocked = self.config.allowed_servers, self.config.blocked_servers
        return (allowed is None or peer_id in allowed) and peer_id not in blocked

    def banned(self) -> set[str]:
        """Peers not to route through: recently failed ones, and those without the client's adapter."""
        now = time.monotonic()
        banned = {peer for bans in (self._banned_until, self._distrusted_until) for peer, until in bans.items() if until > now}
        adapter = self.config.active_adapter
        if adapter is not None:
            banned |= {peer for peer, span in self.spans.items() if adapter not in span.server_info.adapters}
        return banned

    def ban(self, peer_id: str, reason: str, duration: Optional[float] = None) -> None:
        """Avoid the peer: after a failure for ban_timeout seconds, doubling with consecutive failures,
        until it succeeds again; with `duration` (a wrong answer, client/spot_check.py) for that long,
        whatever happens meanwhile. A ban never shortens an earlier, longer one."""
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        bans = self._banned_until if duration is None else self._distrusted_until
        if duration is None:
            duration = self.config.ban_timeout * 2 ** min(failures - 1, 6)
        until = time.monotonic() + duration
        self.ban_reasons.pop(peer_id, None)  # re-inserted last: the oldest reasons are forgotten first
        self.ban_reasons[peer_id] = reason
        while len(self.ban_reasons) > MAX_BAN_REASONS:
            del self.ban_reasons[next(iter(self.ban_reasons))]
        if until > bans.get(peer_id, 0.0):
            bans[peer_id] = until
            logger.warning(f"Avoiding server {peer_id[-6:]} for {duration:.0f} s: {reason}")

    def succeeded(self, peer_id: str) -> None:
        if self._failures.pop(peer_id, None) is not None:
            self._banned_until.pop(peer_id, None)

    def latency_model(self, needed_tokens: int = 0) -> LatencyModel:
        return LatencyModel(
            dict(self.pings.rtts), push=self.config.use_push, default_rtt=self.config.default_rtt, needed_tokens=needed_tokens
        )

    def avoided(self) -> set[str]:
        """Peers to plan around: banned ones, and those whose latest ping got no answer."""
        return self.banned() | self.pings.unanswered

    def _plan(self, plan: Callable[[set[str]], T]) -> T:
        """plan(peers to avoid), around unanswered peers too unless only they cover some block."""
        try:
            return plan(self.avoided())
        except NoRouteError:
            if not self.pings.unanswered:
                raise
            return plan(self.banned())  # _answer_pings asks the unreachable ones again before they are used

    async def make_training_routes(self, start: int, end: int, count: int) -> list[tuple[list[RemoteSpanInfo], float]]:
        """Up to `count` different training chains with their throughput weights (planner.make_training_routes)."""
        await self.make_route(start, end, training=True)  # waits until at least one chain exists
        return self._plan(lambda avoid: make_training_routes(self.spans, start, end, count, banned=avoid))

    async def make_route(
        self, start: int, end: int, *, training: bool = False, needed_tokens: int = 0, timeout: Optional[float] = None
    ) -> list[RemoteSpanInfo]:
        """A chain covering [start, end); waits (re-reading the DHT) until one exists or timeout passes.

        Inference chains minimize the modelled step time; training chains (training=True) spread load.
        """
        deadline = time.monotonic() + (self.config.connect_timeout if timeout is None else timeout)
        await self.refresh()
        delay = 0.2
        while True:
            try:
                if training:
                    route = self._plan(lambda avoid: make_training_route(self.spans, start, end, banned=avoid))
                else:
                    model = self.latency_model(needed_tokens)
                    route = self._plan(lambda avoid: make_route(self.spans, start, end, banned=avoid, model=model))
            except NoRouteError:
                if time.monotonic() + delay > deadline:
                    raise
            else:
                if await self._answer_pings(route):
                    logger.debug(f"Route for blocks {start}:{end}: {route}")
                    return route
                if time.monotonic() > deadline:  # each pass bans one or more: bounded, but not by the count
                    raise NoRouteError(f"no chain for blocks {start}:{end} answered in time")
                continue  # banned again: plan without them
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            await self.refresh(force=True)

    async def _answer_pings(self, route: list[RemoteSpanInfo]) -> bool:
        """Whether the suspect servers of the route answer a ping now; those that do not are banned.

        Suspects failed a request before (their ban is over) or their latest ping could not reach
        them. A crashed server's records stay in the DHT, as they were, until they expire: without
        this check each one could cost a caller one of its retries, every time its ban ends, and a
        caller could give up while live servers serve every block.
        """
        suspects = [span.peer_id for span in route if span.peer_id in self._failures or span.peer_id in self.pings.unreachable]
        if not suspects:
            return True
        self.pings.sent += len(suspects)
        answers = await asyncio.gather(
            *(call_info(self.node.p2p, peer, timeout=self.config.ping_timeout) for peer in suspects), return_exceptions=True
        )
        unreachable = [(peer, answer) for peer, answer in zip(suspects, answers) if isinstance(answer, Exception)]
        for peer, error in unreachable:
            self.ban(peer, f"does not answer a ping: {error!r}")
        answered = set(suspects) - {peer for peer, _ in unreachable}
        self.pings.unreachable -= answered
        self.pings.unanswered -= answered
        return not unreachable
