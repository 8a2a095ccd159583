"""make_route(): a chain of spans covering [start, end). Pure: no I/O, no clocks.

The current rule is greedy: from the first uncovered block, take the server that reaches farthest
(ties: higher throughput, then peer id for determinism). This minimizes the number of hops, which
on a fast local network is what dominates a decode step; the routing issue replaces it with a
latency model.
"""

from __future__ import annotations

from typing import Collection, Mapping

from petals_like.data_structures import RemoteSpanInfo


class NoRouteError(RuntimeError):
    """No server (that is not banned) covers some block: the swarm cannot serve the model right now."""


def make_route(
    spans: Mapping[str, RemoteSpanInfo], start: int, end: int, *, banned: Collection[str] = ()
) -> list[RemoteSpanInfo]:
    route: list[RemoteSpanInfo] = []
    block = start
    while block < end:
        candidates = [s for p, s in spans.items() if p not in banned and s.start <= block < s.end]
        if not candidates:
            raise NoRouteError(f"no server serves block {block} (needed {start}:{end}; "
                               f"{len(spans)} servers known, {len(banned)} banned)")  # fmt: skip
        best = max(candidates, key=lambda s: (min(s.end, end), s.server_info.throughput, s.peer_id))
        route.append(best.cut(block, min(best.end, end)))
        block = route[-1].end
    return route
