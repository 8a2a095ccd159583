"""Per-client limits on a real server: open sessions per peer and the share of the KV pool."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hivemind.p2p import P2PHandlerError

from petals_like.client.transport import InferenceStream
from petals_like.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from petals_like.dht.node import SwarmNode
from tests.swarm import LOCALHOST, Swarm, running_swarm, wait_until

NUM_BLOCKS = 8
HIDDEN = 64
PAGE = 16
POOL_PAGES = 64
SESSIONS_PER_PEER = 3


@pytest.fixture(scope="module")
def swarm(tiny_model: Path) -> Iterator[Swarm]:
    with running_swarm(
        tiny_model,
        ["0:8"],
        kv_cache_tokens=POOL_PAGES * PAGE,
        page_size=PAGE,
        max_alloc_timeout=0.2,
        max_sessions_per_peer=SESSIONS_PER_PEER,
        max_cache_share=0.5,
    ) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def clients(swarm: Swarm) -> Iterator[tuple[SwarmNode, SwarmNode]]:
    """Two clients: two peer ids, as two people would have."""
    nodes: list[SwarmNode] = []
    try:
        for name in ("client-a", "client-b"):
            nodes.append(SwarmNode(swarm.peers, host_maddrs=LOCALHOST, client_mode=True, name=name))
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            node.shutdown()


class Client:
    """Raw inference streams of one client node to the module's server."""

    def __init__(self, swarm: Swarm, node: SwarmNode):
        self.server = swarm.servers[0]
        self.node = node
        self.streams: dict[str, InferenceStream] = {}

    def open(self, tokens: int, max_length: int = 1024) -> str:
        """A new session with a first step of `tokens` tokens; its id."""
        span = RemoteSpanInfo(self.server.node.peer_id, 0, NUM_BLOCKS, ServerInfo(ServerState.ONLINE, 0, NUM_BLOCKS))
        sid = uuid.uuid4().hex
        meta = {"session_id": sid, "start": 0, "end": NUM_BLOCKS, "max_length": max_length, "batch_size": 1}

        async def run() -> None:
            stream = InferenceStream(self.node.p2p, span)
            await stream.open(timeout=10)
            self.streams[sid] = stream
            await stream.step(torch.randn(1, tokens, HIDDEN), meta, timeout=30)

        self.node.run(run(), timeout=60)
        return sid

    def step(self, sid: str, tokens: int = 1) -> torch.Tensor:
        stream = self.streams[sid]
        return self.node.run(stream.step(torch.randn(1, tokens, HIDDEN), {"session_id": sid}, timeout=30), timeout=60)

    def close_all(self) -> None:
        for sid, stream in list(self.streams.items()):
            self.node.run(stream.close({"session_id": sid}), timeout=30)
        self.streams.clear()


def error_of(fn, *args) -> str:
    with pytest.raises(P2PHandlerError) as info:
        fn(*args)
    return str(info.value)


def server_idle(swarm: Swarm) -> bool:
    sessions = swarm.servers[0].sessions
    return not sessions.sessions and sessions.pool.num_free + len(sessions.prefix_index) == sessions.pool.num_pages


def test_open_sessions_per_client_are_limited(swarm, clients):
    a, b = Client(swarm, clients[0]), Client(swarm, clients[1])
    try:
        held = [a.open(4) for _ in range(SESSIONS_PER_PEER)]
        assert "max_sessions_per_peer" in error_of(a.open, 4)
        other = b.open(4)  # another client is not affected
        for sid in held:
            assert a.step(sid).shape == (1, 1, HIDDEN)  # nor are the sessions already open
        assert b.step(other).shape == (1, 1, HIDDEN)
        a.node.run(a.streams.pop(held[0]).close({"session_id": held[0]}), timeout=30)
        wait_until(lambda: len([s for s in swarm.servers[0].sessions.sessions.values()]) == SESSIONS_PER_PEER, 10)
        a.open(4)  # a closed session frees its slot
    finally:
        a.close_all()
        b.close_all()
    wait_until(lambda: server_idle(swarm), 10, message="every session closed, every page back")


def test_a_client_alone_may_use_the_whole_pool_but_not_its_neighbours_share(swarm, clients):
    a, b = Client(swarm, clients[0]), Client(swarm, clients[1])
    try:
        # alone, one client may hold more than half of the pool
        big = a.open(40 * PAGE)
        a.step(big)
        a.close_all()
        wait_until(lambda: server_idle(swarm), 10)

        neighbour = b.open(4 * PAGE)
        within = a.open(30 * PAGE)  # 30 of 64 pages: within its half
        a.step(within, PAGE)  # 31 pages
        error = error_of(a.step, within, 4 * PAGE)  # 35 > 32 while the neighbour holds pages
        assert "KV cache share" in error and "max_cache_share" in error and "retry" in error
        assert b.step(neighbour).shape == (1, 1, HIDDEN)  # the neighbour goes on
        # the refused session ended (its client may go elsewhere) and gave all its pages back
        a.streams.pop(within)
        pool = swarm.servers[0].sessions.pool
        wait_until(lambda: pool.num_pages - pool.num_free == 4 + 1, 10, message="only the neighbour's pages held")
        b.close_all()
        wait_until(lambda: server_idle(swarm), 10)
        a.step(a.open(40 * PAGE), PAGE)  # the neighbour left: the whole pool is open again
    finally:
        a.close_all()
        b.close_all()
    wait_until(lambda: server_idle(swarm), 10, message="every session closed, every page back")
