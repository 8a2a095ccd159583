"""One read of the swarm: which models it serves, each model's block records, and a probe of each online server.

All of it runs on the SwarmNode's event loop; read() is what the dashboard's refresh thread and
the terminal view call. Everything read is a stranger's record, validated by dht/records.py; the
limits below keep a flood of records from turning one read into an unbounded amount of work.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Mapping, Optional

from petals_like.dashboard.state import Probe, build_state
from petals_like.data_structures import ServerInfo, ServerState
from petals_like.dht.announce import get_block_infos, get_models
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import ModelInfo, check_dht_prefix
from petals_like.wire import call_info

logger = logging.getLogger(__name__)


def parse_model_arg(text: str) -> tuple[str, int]:
    """'PREFIX:NUM_BLOCKS' (the form of --models) -> (prefix, num_blocks)."""
    prefix, sep, count = text.rpartition(":")
    try:
        if not sep:
            raise ValueError("no ':'")
        return check_dht_prefix(prefix), ModelInfo.from_record({"num_blocks": int(count)}).num_blocks
    except ValueError as e:
        raise ValueError(f"expected DHT_PREFIX:NUM_BLOCKS, got {text!r} ({e})") from None


class SwarmReader:
    def __init__(
        self,
        node: SwarmNode,
        *,
        models: Optional[Mapping[str, int]] = None,
        discover: bool = True,
        rpc_timeout: float = 3.0,
        max_models: int = 64,
        max_blocks: int = 1024,
        max_probes: int = 512,
        probe_concurrency: int = 32,
    ):
        self.node = node
        self.explicit = {check_dht_prefix(prefix): ModelInfo(num_blocks=n) for prefix, n in (models or {}).items()}
        self.discover = discover  # also list the models announced under MODELS_KEY
        self.rpc_timeout = rpc_timeout  # seconds a server has to answer rpc_info before it counts as unreachable
        self.max_models = max_models  # announced models watched (explicit ones always are)
        self.max_blocks = max_blocks  # announced models with more blocks than this are not read
        self.max_probes = max_probes  # servers probed per read; the rest are shown unprobed
        self.probe_concurrency = probe_concurrency
        self._last_probes: dict[str, tuple[float, Probe]] = {}  # peer -> (when, result) of its latest probe

    def read(self, timeout: Optional[float] = None) -> dict[str, Any]:
        """Read the swarm once and return build_state()'s view of it."""
        if timeout is None:  # DHT reads, then the probes in waves of probe_concurrency
            timeout = 60.0 + self.rpc_timeout * -(-self.max_probes // self.probe_concurrency)
        return self.node.run(self.aread(), timeout=timeout)

    async def aread(self) -> dict[str, Any]:
        started, errors = time.monotonic(), []
        models = dict(self.explicit)
        if self.discover:
            try:
                models.update(self._choose(await get_models(self.node.dht)))
            except Exception as e:  # a failed read is shown on the page; the next one may work
                logger.warning(f"Reading the list of models failed: {e!r}")
                errors.append(f"reading the list of models failed: {e!r}")

        block_infos = {}
        results = await asyncio.gather(
            *(
                get_block_infos(self.node.dht, prefix, range(model.num_blocks), num_blocks=model.num_blocks)
                for prefix, model in models.items()
            ),
            return_exceptions=True,
        )
        for prefix, result in zip(models, results):
            if isinstance(result, BaseException):
                logger.warning(f"Reading the blocks of {prefix} failed: {result!r}")
                errors.append(f"reading the blocks of {prefix} failed: {result!r}")
            else:
                block_infos[prefix] = result

        online = {
            peer
            for infos in block_infos.values()
            for servers in infos
            for peer, info in servers.items()
            if info.state == ServerState.ONLINE
        }
        for infos in block_infos.values():  # probes reach servers behind NAT through their relays
            for servers in infos:
                for peer, info in servers.items():
                    self.node.routes.learn(peer, info.addrs, info.using_relay)
        probes = await self.probe_all(sorted(online))
        return build_state(models, block_infos, probes, now=time.time(), read_seconds=time.monotonic() - started, errors=errors)

    def _choose(self, announced: dict[str, ModelInfo]) -> dict[str, ModelInfo]:
        """The announced models to read: not given explicitly, small enough, at most max_models of them."""
        chosen = {}
        for prefix in sorted(announced):
            model = announced[prefix]
            if prefix in self.explicit:
                continue
            if model.num_blocks > self.max_blocks:
                logger.warning(f"Not watching {prefix!r}: it claims {model.num_blocks} blocks (limit {self.max_blocks})")
                continue
            if len(chosen) == self.max_models:
                logger.warning(f"Watching only {self.max_models} of {len(announced)} announced models")
                break
            chosen[prefix] = model
        return chosen

    async def probe_all(self, peers: list[str]) -> dict[str, Probe]:
        """Probe up to max_probes of `peers`; the others keep the result of their latest probe, if any.

        Anyone can announce servers that do not exist, as many as they like: which max_probes are
        probed must not be theirs to choose. Servers that answered their latest probe go first, then
        those never probed, then the rest, least recently probed first; so every server is probed
        within a few reads, and a flood of records does not push live servers out of the budget.
        """
        last = self._last_probes
        ties = {p: random.random() for p in peers}  # not by peer id: anyone can make ids that sort first
        order = sorted(
            peers, key=lambda p: (p not in last or not last[p][1].reachable, p in last, last[p][0] if p in last else 0.0, ties[p])
        )
        chosen = order[: self.max_probes]
        if len(order) > self.max_probes:
            logger.warning(f"Probing {self.max_probes} of {len(peers)} online servers (the rest show their last probe)")
        limit = asyncio.Semaphore(self.probe_concurrency)

        async def probe(peer: str) -> Probe:
            async with limit:
                return await self.probe(peer)

        fresh = dict(zip(chosen, await asyncio.gather(*(probe(peer) for peer in chosen))))
        now = time.monotonic()
        self._last_probes = {p: (now, fresh[p]) if p in fresh else last[p] for p in peers if p in fresh or p in last}
        return {p: self._last_probes[p][1] for p in peers if p in self._last_probes}

    async def probe(self, peer_id: str) -> Probe:
        """Call rpc_info once: reachable if a valid answer comes back within rpc_timeout."""
        started = time.perf_counter()
        try:
            answer = await call_info(self.node.p2p, peer_id, timeout=self.rpc_timeout)
        except asyncio.TimeoutError:
            return Probe(False, error=f"no answer in {self.rpc_timeout:g} s")
        except Exception as e:  # any failure to get an answer is what unreachable means here
            return Probe(False, error=f"{type(e).__name__}: {e}")
        rtt = time.perf_counter() - started
        try:
            live = ServerInfo.from_record(answer.announced)
        except ValueError as e:
            logger.debug(f"rpc_info of {peer_id[-6:]} has no valid server info: {e}")
            live = None
        return Probe(True, rtt=rtt, live=live)
