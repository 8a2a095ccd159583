"""Server health during a soak run: rpc_info counters, memory, threads and open files of each server
process (which processes are left: petals_like/testing/processes.py).

rpc_info gives the pool (cache_tokens_total, cache_tokens_left, prefix_cache_tokens), the sessions
and the number of asyncio tasks on the server's loop; psutil gives the rest by PID.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Sequence

import psutil

from petals_like.dht.node import SwarmNode
from petals_like.testing.processes import p2pd_children
from petals_like.wire import call_info

INFO_TIMEOUT = 10.0  # seconds for one rpc_info
MIB = 2**20


@dataclass
class ServerHealth:
    rss_mib: float  # resident memory of the server process
    p2pd_rss_mib: float  # of its p2p daemon
    threads: int
    open_files: int  # file descriptors: sockets included
    asyncio_tasks: int  # on the server's event loop
    open_sessions: int
    cache_tokens_total: int
    cache_tokens_left: int  # free
    prefix_cache_tokens: int  # in the prefix index (held by no session once every session is closed)

    @property
    def tokens_in_use(self) -> int:
        """KV tokens neither free nor in the prefix cache: held by sessions, or by steps still running."""
        return max(0, self.cache_tokens_total - self.cache_tokens_left - self.prefix_cache_tokens)

    def as_dict(self) -> dict:
        return dict(asdict(self), tokens_in_use=self.tokens_in_use)


class HealthMonitor:
    """Reads the health of the servers {name: (peer id, pid)} through a client node of its own."""

    def __init__(self, initial_peers: Sequence[str], servers: dict[str, tuple[str, int]]):
        self.servers = servers
        self.node = SwarmNode(initial_peers, client_mode=True, name="soak-monitor")

    def read(self) -> dict[str, ServerHealth]:
        return {name: self._read(peer_id, pid) for name, (peer_id, pid) in self.servers.items()}

    def _read(self, peer_id: str, pid: int) -> ServerHealth:
        info = self.node.run(call_info(self.node.p2p, peer_id, timeout=INFO_TIMEOUT), timeout=INFO_TIMEOUT + 5)
        process = psutil.Process(pid)
        with process.oneshot():
            rss, threads, files = process.memory_info().rss, process.num_threads(), process.num_fds()
        daemons = p2pd_children(pid)
        return ServerHealth(
            rss_mib=round(rss / MIB, 1),
            p2pd_rss_mib=round(sum(_rss(d) for d in daemons) / MIB, 1),
            threads=threads,
            open_files=files,
            asyncio_tasks=info.asyncio_tasks,
            open_sessions=info.open_sessions,
            cache_tokens_total=info.cache_tokens_total,
            cache_tokens_left=info.cache_tokens_left,
            prefix_cache_tokens=info.prefix_cache_tokens,
        )

    def settle(self, baseline: dict[str, ServerHealth], timeout: float, slack: int) -> dict[str, ServerHealth]:
        """Poll until every server is idle again (see is_idle) or `timeout` s pass; returns the last reading."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.read()
            if all(is_idle(health[name], baseline[name], slack) for name in health) or time.monotonic() > deadline:
                return health
            time.sleep(0.5)

    def shutdown(self) -> None:
        self.node.shutdown()


def is_idle(health: ServerHealth, baseline: ServerHealth, slack: int) -> bool:
    """No session open, every page free or only cached, and the loop's tasks and the open files (a stream
    left open holds a socket) back at their level before the run, give or take `slack`."""
    return (
        health.open_sessions == 0
        and health.tokens_in_use == 0
        and health.asyncio_tasks <= baseline.asyncio_tasks + slack
        and health.open_files <= baseline.open_files + slack
    )


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0
