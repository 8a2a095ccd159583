"""Which blocks a server serves: chosen at start where the swarm is weakest, re-checked every
balance period, and moved when the swarm's bottleneck would gain enough (block_selection.py)."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Optional, Protocol

import torch

from petals_like.data_structures import parse_block_range
from petals_like.dht.announce import get_block_infos
from petals_like.server.announcer import ServedSpan
from petals_like.server.block_selection import block_throughputs, choose_best_start, should_move
from petals_like.server.loading import free_memory

logger = logging.getLogger(__name__)


class MovableSpan(ServedSpan, Protocol):
    stopped: threading.Event  # set when the server stops

    def move(self, start: int) -> None: ...


class Balancer:
    def __init__(self, server: MovableSpan):
        self.server = server
        self.moves = 0
        self._thread: Optional[threading.Thread] = None

    def choose_blocks(self) -> tuple[int, int]:
        """The span to serve at start: --block_indices, or --num_blocks (or what fits) where the swarm is weakest."""
        server, config = self.server, self.server.config
        num_model_blocks = server.spec.num_blocks
        if config.block_indices:
            return parse_block_range(config.block_indices, num_model_blocks)
        num_blocks = min(config.num_blocks or self._blocks_that_fit(), num_model_blocks)
        # servers that start together: a random moment each, so that each sees the others' JOINING records
        time.sleep(random.uniform(0, config.join_delay))
        infos = server.node.run(self._read_swarm())
        throughput = config.throughput if not isinstance(config.throughput, str) else 1.0
        start = choose_best_start(block_throughputs(infos, exclude=server.node.peer_id), num_blocks, throughput)
        return start, start + num_blocks

    def _blocks_that_fit(self) -> int:
        """As many blocks as 80% of the free memory holds (weights plus a margin for activations)."""
        spec, server = self.server.spec, self.server
        per_block = 4 * spec.hidden_size * spec.head_dim * (spec.num_heads + spec.num_kv_heads) // 2
        per_block += spec.feed_forward_parameters()
        per_block_bytes = per_block * torch.empty((), dtype=server.dtype).element_size() * 1.2
        return max(1, int(0.8 * free_memory(server.device) // per_block_bytes))

    def _read_swarm(self):
        spec, server = self.server.spec, self.server
        return get_block_infos(server.node.dht, server.dht_prefix, range(spec.num_blocks), num_blocks=spec.num_blocks)

    def start(self) -> None:
        """Re-balance on a thread of its own until the server stops."""
        self._thread = threading.Thread(target=self._run, name="balancer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Every randomized balance period: move if the swarm's bottleneck would gain enough."""
        server = self.server
        period = server.config.balance_period
        while not server.stopped.wait(period * random.uniform(0.5, 1.5)):
            try:
                target = self.move_target()
                if target is not None:
                    # servers that noticed the same hole wait a random moment and look again: the
                    # first to move announces it, and the others see that they are no longer needed
                    if server.stopped.wait(random.uniform(0, period)):
                        return
                    if self.move_target() == target:
                        server.move(target)
                        self.moves += 1
            except Exception as e:  # a failed check is retried next period
                logger.warning(f"Re-balancing check failed: {e!r}")

    def move_target(self) -> Optional[int]:
        """Where this server's span should start instead, or None to stay."""
        server = self.server
        infos = server.node.run(self._read_swarm(), timeout=60)
        totals = block_throughputs(infos, exclude=server.node.peer_id)
        for block in range(server.start_block, server.end_block):
            totals[block] += server.throughput  # our own records may not have spread yet
        return should_move(totals, server.start_block, server.end_block, server.throughput, server.config.balance_quality)
