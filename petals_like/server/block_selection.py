"""Where a server should serve, and when it should move: pure functions over the swarm's numbers.

The swarm is only as fast as its least-served block, so everything here maximizes the swarm's
bottleneck: the minimum over blocks of the total throughput of the servers serving each block
(a block nobody serves has 0). Inputs are per-block totals, as block_throughputs() computes them
from the DHT records.

Join: choose_best_start() takes the span that leaves the best swarm after adding this server:
the highest bottleneck first, then the fewest blocks at that bottleneck (so uncovered blocks are
covered before anything else), then the weakest span (most room to help), then the lowest start.

Move: should_move() compares the swarm's bottleneck now with the bottleneck after this server
takes the best other span, and says yes only if the gain is more than (1 - balance_quality) of
the server's own throughput (a server can raise the bottleneck by at most its throughput, so the
rule means the same for a swarm of 4 servers and of 4,000) and no block is left uncovered by
leaving. The others' reaction is taken into account in the way that keeps servers from chasing
each other: the target is chosen with this server already gone from its current span (the hole
it leaves is priced in), moves happen at randomized moments and are re-checked just before, so
each server reacts to the moves before it, and a move that gains less than the threshold is not
worth the reload.
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


def choose_best_start(throughputs: Sequence[float], num_blocks: int, throughput: float = 1.0) -> int:
    """The start of the span of num_blocks blocks that a server of `throughput` should take (see the module docstring).

    All candidate starts are scored at once (a starts x blocks matrix), so that the swarm
    simulator can afford hundreds of thousands of calls.
    """
    totals = np.asarray(throughputs, dtype=np.float64)
    if not 0 < num_blocks <= len(totals):
        raise ValueError(f"num_blocks={num_blocks} not in [1, {len(totals)}]")
    throughput = max(float(throughput), 1e-9)  # a server of unknown speed still covers blocks
    starts = np.arange(len(totals) - num_blocks + 1)
    blocks = np.arange(len(totals))
    inside = (blocks[None, :] >= starts[:, None]) & (blocks[None, :] < starts[:, None] + num_blocks)
    after = totals[None, :] + throughput * inside  # [starts, blocks]: the swarm after joining at each start
    bottleneck = after.min(axis=1)
    at_bottleneck = (after <= bottleneck[:, None]).sum(axis=1)
    span_sums = (totals[None, :] * inside).sum(axis=1)
    # best: highest bottleneck, then fewest blocks at it, then the weakest span, then the lowest start
    return int(starts[np.lexsort((starts, span_sums, at_bottleneck, -bottleneck))[0]])


def swarm_bottleneck(throughputs: Sequence[float]) -> float:
    return float(min(throughputs)) if len(throughputs) else 0.0


def should_move(
    throughputs: Sequence[float], start: int, end: int, throughput: float, balance_quality: float = 0.75
) -> Optional[int]:
    """The new start this server (serving [start, end) at `throughput`, included in `throughputs`)
    should move to, or None to stay.

    Moves only if the swarm's bottleneck grows by more than (1 - balance_quality) x throughput
    (0 < balance_quality <= 1; 1 moves for any gain), and never if leaving would leave one of its
    blocks with no server.
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
    if then - now > (1 - balance_quality) * throughput + 1e-9:
        return target
    return None
