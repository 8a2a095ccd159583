"""What a server says about itself in the DHT, and when.

Its record (ServerInfo) for every block it serves: span, throughput (penalized when relayed), free
cache, open sessions, the compute thread's load since the last announcement, and round trips to the
servers that can follow its span (next_pings, for the clients' route planning). Re-announced every
announce_period, with the relay reservations renewed and reachability re-checked now and then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import Optional, Protocol

import torch

from petals_like import __version__
from petals_like.config import ServerConfig
from petals_like.data_structures import MAX_PINGS, ServerInfo, ServerState
from petals_like.dht.announce import declare_blocks, get_block_infos
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import ModelInfo
from petals_like.dht.relay import RELAY_PENALTY
from petals_like.models.spec import ModelSpec
from petals_like.routing.pings import PingTable
from petals_like.server.handler import Handlers
from petals_like.server.scheduler import Scheduler
from petals_like.server.sessions import SessionManager

logger = logging.getLogger(__name__)

ROUTE_LOOKUP_PERIOD = 30.0  # seconds between DHT look-ups for one next server we cannot reach yet


class ServedSpan(Protocol):
    """What the announcer and the balancer read of their server (server.Server)."""

    config: ServerConfig
    node: SwarmNode
    spec: ModelSpec
    dht_prefix: str
    model_info: ModelInfo
    adapter_names: tuple[str, ...]
    dtype: torch.dtype
    device: torch.device
    state: ServerState
    start_block: int
    end_block: int
    throughput: float  # block-steps/s (server/throughput.py)
    inference_rps: float
    forward_rps: float
    scheduler: Optional[Scheduler]
    sessions: Optional[SessionManager]
    handlers: Optional[Handlers]


class Announcer:
    def __init__(self, server: ServedSpan):
        self.server = server  # its span, numbers and sessions are what gets announced
        self.announced_load = 0.0
        self._load_mark = (time.monotonic(), 0.0)  # (when, scheduler busy seconds) at the last announcement
        self.pings = PingTable(timeout=2.0, period=0.0)  # measured once per announcement
        self.next_pings: dict[str, float] = {}
        self._looked_up: dict[str, float] = {}  # peer -> when the DHT was last read to reach it (learn_route)

    def server_info(self, state: ServerState) -> ServerInfo:
        server, node = self.server, self.server.node
        sessions = server.sessions
        return ServerInfo(
            state=state,
            start_block=server.start_block,
            end_block=server.end_block,
            # a relayed server costs every step an extra hop: routing prefers a direct one (data_structures.py)
            throughput=float(server.throughput) * (RELAY_PENALTY if node.using_relay else 1.0),
            inference_rps=float(server.inference_rps),
            forward_rps=float(server.forward_rps),
            cache_tokens_left=sessions.free_tokens if sessions else 0,
            open_sessions=len(sessions.sessions) if sessions else 0,
            load=self.announced_load,
            version=__version__,
            torch_dtype=str(server.dtype).replace("torch.", ""),
            quant_type=server.config.quant_type,
            adapters=server.adapter_names,
            public_name=server.config.public_name,
            next_pings=dict(self.next_pings),
            using_relay=node.using_relay,
            addrs=tuple(node.record_addrs()),
        )

    def live_fields(self) -> dict:
        """The record's fields as of now, for rpc_info."""
        return self.server_info(self.server.state).to_record()

    def _load(self) -> float:
        """Busy fraction of the compute thread since the previous call (one call per announcement)."""
        scheduler = self.server.scheduler
        if scheduler is None:
            return 0.0
        now, busy = time.monotonic(), scheduler.stats.busy_seconds
        last_time, last_busy = self._load_mark
        self._load_mark = (now, busy)
        return min(1.0, max(0.0, (busy - last_busy) / max(now - last_time, 1e-6)))

    def announce(self, state: ServerState) -> None:
        """From any thread but the node's: the server is now in `state`; say so."""
        self.server.state = state
        self.server.node.run(self.declare(state), timeout=60)

    async def _following(self) -> list[str]:
        """The online servers that can follow this span (they serve block end_block); learns how to reach
        each (directly or through its relays) for pushes."""
        server, node = self.server, self.server.node
        if server.end_block >= server.spec.num_blocks:
            return []
        (following,) = await get_block_infos(node.dht, server.dht_prefix, [server.end_block], num_blocks=server.spec.num_blocks)
        peers = [p for p, info in following.items() if p != node.peer_id and info.state == ServerState.ONLINE]
        now = time.monotonic()
        for peer in peers:
            node.routes.learn(peer, following[peer].addrs, following[peer].using_relay)
        self._looked_up = {p: t for p, t in self._looked_up.items() if now - t < ROUTE_LOOKUP_PERIOD} | dict.fromkeys(peers, now)
        return peers

    async def learn_route(self, peer_id: str) -> None:
        """Before the first push to a server met since the last look-up: read how to reach it (at most once
        a ROUTE_LOOKUP_PERIOD per unknown peer, so that clients naming strangers cost little)."""
        if (
            peer_id in self.server.node.routes.peers
            or time.monotonic() - self._looked_up.get(peer_id, -1e9) < ROUTE_LOOKUP_PERIOD
        ):
            return
        self._looked_up[peer_id] = time.monotonic()
        await self._following()

    async def _measure_next_pings(self) -> None:
        """Round trips to the servers that can follow this span (they serve block end_block)."""
        peers = await self._following()
        self.pings.forget(peers)
        # at most MAX_PINGS of them: those that answered before first, the rest at random (records are claims,
        # and whoever floods the DHT with servers that do not exist must not crowd out the real ones)
        answered = {p for p in peers if p in self.pings.rtts and p not in self.pings.unanswered}
        others = [p for p in peers if p not in answered]
        random.shuffle(others)
        peers = (sorted(answered) + others)[:MAX_PINGS]
        await self.pings.measure(self.server.node.p2p, peers)
        self.next_pings = self.pings.snapshot(peers)

    async def declare_range(self, state: ServerState, start: int, end: int) -> None:
        """Records in `state` for blocks [start, end) (e.g. OFFLINE for the span a move leaves)."""
        server = self.server
        await declare_blocks(
            server.node.dht,
            server.dht_prefix,
            range(start, end),
            dataclasses.replace(self.server_info(state), start_block=start, end_block=end),
            identity=server.node.identity,
            expiration=server.config.expiration,
        )

    async def declare(self, state: ServerState) -> None:
        server = self.server
        if state == ServerState.ONLINE:
            try:  # bounded: pings are a hint for routing; announcing matters more
                await asyncio.wait_for(self._measure_next_pings(), server.config.announce_period / 2)
            except Exception as e:
                logger.debug(f"Measuring next pings failed: {e!r}")
        self.announced_load = self._load()
        await declare_blocks(
            server.node.dht,
            server.dht_prefix,
            range(server.start_block, server.end_block),
            self.server_info(state),
            identity=server.node.identity,
            expiration=server.config.expiration,
            model=server.model_info if state != ServerState.OFFLINE else None,
        )

    async def run_forever(self) -> None:
        server, config = self.server, self.server.config
        rounds = 0
        while True:
            await asyncio.sleep(config.announce_period)
            rounds += 1
            try:  # relay slots are renewed with every announcement; reachability is checked again now and then
                recheck = rounds % max(1, round(config.reachability_period / config.announce_period)) == 0
                await asyncio.wait_for(server.node.maintain_reachability(recheck), config.announce_period / 2)
            except Exception as e:
                logger.warning(f"Renewing relays / checking reachability failed: {e!r}")
            if server.handlers is not None:
                server.handlers.backend.adapters.expire()  # client LoRA weights unused for adapter_idle_timeout
            try:
                await self.declare(server.state)
            except Exception as e:  # a failed re-announcement is retried next period
                logger.warning(f"Re-announcement failed: {e!r}")
