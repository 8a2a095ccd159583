"""Chains of servers covering blocks [start, end). Pure: no I/O, no clocks.

Inference chains: the latency model
-----------------------------------
A chain is a list of (server s_i, blocks [b_i, b_{i+1})). The expected time of one decode step is

    T = sum_i link(s_{i-1}, s_i) + sum_i compute(s_i, b_{i+1} - b_i) + back(s_n)

  compute(s, k) = k / throughput(s) / max(1 - load(s), MIN_IDLE)
      throughput is announced in block-steps per second (one token through one block at batch 1),
      so k / throughput is the time of k blocks; a server busy a fraction `load` of the time serves
      us that much slower (queueing behind other sessions).
  Without push the client relays every hop itself:
      link(prev, s) = rtt(client, s),  back = 0
  With push (servers send their output straight to the next server):
      link(client, s_1) = rtt(client, s_1) / 2
      link(s_{i-1}, s_i) = ping(s_{i-1} -> s_i) / 2   (announced by s_{i-1} in next_pings;
                            unknown: (rtt(client, s_{i-1}) + rtt(client, s_i)) / 2, i.e. via the client)
      back(s_n) = rtt(client, s_n) / 2
  rtt(client, s) is the client's smoothed measurement; `default_rtt` where none exists yet.
  A server whose free cache (cache_tokens_left) cannot hold the session gets CACHE_PENALTY added:
  it is used only when no other server covers those blocks.

The chain minimizing T is found by dynamic programming over block boundaries: a state is a boundary
b plus the server that computed up to it (the next link's cost depends on it); from each state, a
server covering b may run up to the end of its span or to any boundary where another span starts.
Keeping the `beam` best states per boundary (beam search) bounds the work for swarms of thousands
of servers; with fewer servers per boundary than the beam, the result is exact.

Forward/backward chains (training) spread load instead: at each boundary, a server covering it is
drawn at random with weight throughput x (1 - load), and serves as far as its span goes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Collection, Mapping, Optional

from petals_like.data_structures import RemoteSpanInfo

MIN_IDLE = 0.05  # a fully loaded server still counts as 20x slower, not infinitely slow
CACHE_PENALTY = 1000.0  # seconds added for a server without room for the session's cache
DEFAULT_THROUGHPUT = 1.0  # block-steps/s assumed for a server that announces none


class NoRouteError(RuntimeError):
    """No server (that is not banned) covers some block: the swarm cannot serve the model right now."""


@dataclass(frozen=True)
class LatencyModel:
    """What the planner knows about the network (see the module docstring)."""

    client_rtts: Mapping[str, float]  # peer id -> smoothed round trip client <-> server, seconds
    push: bool = False
    default_rtt: float = 0.1  # for servers not measured yet
    needed_tokens: int = 0  # KV cache tokens the session will need on each server

    def rtt(self, peer_id: str) -> float:
        return self.client_rtts.get(peer_id, self.default_rtt)

    def compute(self, span: RemoteSpanInfo, blocks: int) -> float:
        info = span.server_info
        throughput = info.throughput if info.throughput > 0 else DEFAULT_THROUGHPUT
        seconds = blocks / throughput / max(1.0 - info.load, MIN_IDLE)
        if self.needed_tokens and info.cache_tokens_left < self.needed_tokens:
            seconds += CACHE_PENALTY
        return seconds

    def link(self, prev: Optional[RemoteSpanInfo], span: RemoteSpanInfo) -> float:
        if not self.push:
            return self.rtt(span.peer_id)
        if prev is None:
            return self.rtt(span.peer_id) / 2
        ping = prev.server_info.next_pings.get(span.peer_id)
        if ping is None:
            return (self.rtt(prev.peer_id) + self.rtt(span.peer_id)) / 2
        return ping / 2

    def back(self, last: RemoteSpanInfo) -> float:
        return self.rtt(last.peer_id) / 2 if self.push else 0.0

    def chain_time(self, chain: list[RemoteSpanInfo]) -> float:
        """T of a given chain (for tests, benchmarks and logs)."""
        total, prev = 0.0, None
        for span in chain:
            total += self.link(prev, span) + self.compute(span, span.length)
            prev = span
        return total + (self.back(prev) if prev is not None else 0.0)


def _candidates(spans: Mapping[str, RemoteSpanInfo], start: int, end: int, banned: Collection[str]) -> list[RemoteSpanInfo]:
    return [s for p, s in spans.items() if p not in banned and s.start < end and s.end > start]


def _no_route(block: int, start: int, end: int, spans: Mapping, banned: Collection) -> NoRouteError:
    return NoRouteError(
        f"no server serves block {block} (needed {start}:{end}; {len(spans)} servers known, {len(banned)} banned)"
    )


def make_route(
    spans: Mapping[str, RemoteSpanInfo],
    start: int,
    end: int,
    *,
    banned: Collection[str] = (),
    model: Optional[LatencyModel] = None,
    beam: int = 16,
) -> list[RemoteSpanInfo]:
    """The inference chain over [start, end) with the least expected step time under `model`."""
    model = model or LatencyModel({})
    candidates = _candidates(spans, start, end, banned)
    boundaries = sorted({start, end} | {s.start for s in candidates if start < s.start < end})
    # states[b]: up to `beam` entries (time so far, tie-breaker, last server's span cut, chain)
    states: dict[int, list[tuple[float, int, Optional[RemoteSpanInfo], tuple[RemoteSpanInfo, ...]]]] = {
        start: [(0.0, 0, None, ())]
    }
    counter = 1
    for b in boundaries:
        if b == end:
            break
        here = states.pop(b, [])
        if not here:
            continue
        covering = [s for s in candidates if s.start <= b < s.end]
        for span in covering:
            stop = min(span.end, end)
            ends = [e for e in boundaries if b < e <= stop]
            for cost, _, prev, chain in here:
                if prev is not None and prev.peer_id == span.peer_id:
                    continue  # continuing on the same server is the longer cut, already considered
                link = model.link(prev, span)
                for e in ends:
                    cut = span.cut(b, e)
                    total = cost + link + model.compute(span, e - b)
                    entry = (total, counter, cut, chain + (cut,))
                    counter += 1
                    _keep(states.setdefault(e, []), entry, beam)
    finals = [(cost + model.back(prev), chain) for cost, _, prev, chain in states.get(end, [])]
    if not finals:
        raise _no_route(_first_gap(candidates, start, end), start, end, spans, banned)
    return list(min(finals, key=lambda item: item[0])[1])


def _keep(entries: list, entry: tuple, beam: int) -> None:
    """Keep the `beam` cheapest entries, one per last server (the cheaper one of the same server wins)."""
    peer = entry[2].peer_id
    for i, other in enumerate(entries):
        if other[2].peer_id == peer:
            if entry[0] < other[0]:
                entries[i] = entry
            return
    if len(entries) < beam:
        entries.append(entry)
        return
    worst = max(range(len(entries)), key=lambda i: entries[i][0])
    if entry[0] < entries[worst][0]:
        entries[worst] = entry


def _first_gap(candidates: list[RemoteSpanInfo], start: int, end: int) -> int:
    block = start
    while block < end:
        reach = max((s.end for s in candidates if s.start <= block < s.end), default=None)
        if reach is None:
            return block
        block = reach
    return end


def make_training_route(
    spans: Mapping[str, RemoteSpanInfo],
    start: int,
    end: int,
    *,
    banned: Collection[str] = (),
    rng: Optional[random.Random] = None,
) -> list[RemoteSpanInfo]:
    """A chain for forward/backward calls that spreads load: each hop drawn with weight throughput x (1 - load)."""
    rng = rng or random.Random()
    candidates = _candidates(spans, start, end, banned)
    route: list[RemoteSpanInfo] = []
    block = start
    while block < end:
        covering = [s for s in candidates if s.start <= block < s.end]
        if not covering:
            raise _no_route(block, start, end, spans, banned)
        weights = [_weight(s) for s in covering]
        span = rng.choices(covering, weights=weights)[0]
        route.append(span.cut(block, min(span.end, end)))
        block = route[-1].end
    return route


def make_training_routes(
    spans: Mapping[str, RemoteSpanInfo],
    start: int,
    end: int,
    count: int,
    *,
    banned: Collection[str] = (),
    rng: Optional[random.Random] = None,
    attempts: int = 8,
) -> list[tuple[list[RemoteSpanInfo], float]]:
    """Up to `count` different training chains (data parallelism), each with its weight: the slowest
    hop's throughput x (1 - load). Fewer when the swarm has fewer distinct chains; at least one."""
    rng = rng or random.Random()
    found: dict[tuple[str, ...], list[RemoteSpanInfo]] = {}
    for _ in range(count * attempts):
        route = make_training_route(spans, start, end, banned=banned, rng=rng)
        found.setdefault(tuple(s.peer_id for s in route), route)
        if len(found) >= count:
            break
    return [(route, min(_weight(s) for s in route)) for route in found.values()]


def _weight(span: RemoteSpanInfo) -> float:
    info = span.server_info
    return (info.throughput if info.throughput > 0 else DEFAULT_THROUGHPUT) * max(1.0 - info.load, MIN_IDLE)
