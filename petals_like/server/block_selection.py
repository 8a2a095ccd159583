"""Where a joining server should serve: the span whose weakest block has the least throughput.

Pure functions over the swarm's records; the re-balancing issue extends this with moves.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from petals_like.data_structures import ServerInfo, ServerState


def block_throughputs(block_infos: Sequence[Mapping[str, ServerInfo]], *, exclude: str | None = None) -> list[float]:
    """Total announced throughput serving each block (JOINING servers count: they will serve soon)."""
    return [
        sum(info.throughput for peer, info in servers.items() if peer != exclude and info.state != ServerState.OFFLINE)
        for servers in block_infos
    ]


def choose_best_start(throughputs: Sequence[float], num_blocks: int) -> int:
    """The start of the span of num_blocks blocks whose weakest block is the weakest (uncovered first).

    Ties go to the span with the least total throughput, then to the lowest start, so servers that
    join an empty swarm together fill it from block 0 in order.
    """
    if not 0 < num_blocks <= len(throughputs):
        raise ValueError(f"num_blocks={num_blocks} not in [1, {len(throughputs)}]")
    candidates = range(len(throughputs) - num_blocks + 1)
    return min(candidates, key=lambda s: (min(throughputs[s : s + num_blocks]), sum(throughputs[s : s + num_blocks]), s))
