"""Where a server should serve, and when it should move: pure functions over the swarm's numbers.

The swarm is only as fast as its least-served block, so everything here maximizes the swarm's
bottleneck: the minimum over blocks of the total throughput of the servers serving each block
(a block nobody serves has 0). Inputs are per-block totals, as block_throughputs() computes them
from the DHT records.

Join: choose_best_start() takes the span that leaves the best swarm after adding this server:
the highest bottleneck first, then the fewest blocks at that bottleneck (so uncovered blocks are
covered before anything else), then the weakest span (most room to help), then the lowest start.

Move: should_move() compares the swarm's bottleneck now with the bottleneck after this server
takes the best other span, and says yes only if the gain beats `balance_quality` and no block is
left uncovered by leaving. The others' reaction is taken into account in the simplest way that
keeps servers from chasing each other: the target is chosen assuming this server is gone from its
current span (the others will see the hole it leaves), and a move whose only gain is within the
threshold is not worth the reload.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from petals_like.data_structures import ServerInfo, ServerState


def block_throughputs(block_infos: Sequence[Mapping[str, ServerInfo]], *, exclude: str | None = None) -> list[float]:
    """Total announced throughput serving each block (JOINING servers count: they will serve soon)."""
    return [
        sum(info.throughput for peer, info in servers.items() if peer != exclude and info.state != ServerState.OFFLINE)
        for servers in block_infos
    ]


def _score(after: np.ndarray) -> tuple[float, int]:
    """(bottleneck, -number of blocks at it): higher is better."""
    low = float(after.min())
    return low, -int(np.count_nonzero(after <= low))


def choose_best_start(throughputs: Sequence[float], num_blocks: int, throughput: float = 1.0) -> int:
    """The start of the span of num_blocks blocks that a server of `throughput` should take (see the module docstring)."""
    totals = np.asarray(throughputs, dtype=np.float64)
    if not 0 < num_blocks <= len(totals):
        raise ValueError(f"num_blocks={num_blocks} not in [1, {len(totals)}]")
    throughput = max(float(throughput), 1e-9)  # a server of unknown speed still covers blocks
    best_key, best_start = None, 0
    window_sums = np.convolve(totals, np.ones(num_blocks), mode="valid")  # sum of each candidate span
    for start in range(len(totals) - num_blocks + 1):
        after = totals.copy()
        after[start : start + num_blocks] += throughput
        key = (*_score(after), -float(window_sums[start]), -start)
        if best_key is None or key > best_key:
            best_key, best_start = key, start
    return best_start


def swarm_bottleneck(throughputs: Sequence[float]) -> float:
    return float(min(throughputs)) if len(throughputs) else 0.0


def should_move(throughputs: Sequence[float], start: int, end: int, throughput: float,
                balance_quality: float = 0.75) -> Optional[int]:  # fmt: skip
    """The new start this server (serving [start, end) at `throughput`, included in `throughputs`)
    should move to, or None to stay.

    Moves only if the swarm's bottleneck after the move is above the current one divided by
    balance_quality (0 < balance_quality <= 1; 1 moves for any gain), and never if leaving would
    leave one of its blocks with no server.
    """
    if not 0 < balance_quality <= 1:
        raise ValueError(f"balance_quality={balance_quality} not in (0, 1]")
    totals = np.asarray(throughputs, dtype=np.float64)
    without = totals.copy()
    without[start:end] -= throughput
    if np.any(without[start:end] <= 1e-9):
        return None  # this server is the only one on some of its blocks: moving would open a gap
    num_blocks = end - start
    target = choose_best_start(without, num_blocks, throughput)
    if target == start:
        return None
    after = without.copy()
    after[target : target + num_blocks] += throughput
    now, then = swarm_bottleneck(totals), swarm_bottleneck(after)
    if then > now / balance_quality + 1e-9 or (now == 0 and then > 0):
        return target
    return None
