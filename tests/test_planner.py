"""Route planning under the latency model: no network, fixed numbers."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from petals_like.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from petals_like.routing.planner import CACHE_PENALTY, LatencyModel, NoRouteError, make_route, make_training_route


def span(peer: str, start: int, end: int, throughput: float = 100.0, **fields) -> RemoteSpanInfo:
    return RemoteSpanInfo(peer, start, end, ServerInfo(ServerState.ONLINE, start, end, throughput=throughput, **fields))


def swarm(*spans: RemoteSpanInfo) -> dict[str, RemoteSpanInfo]:
    return {s.peer_id: s for s in spans}


def peers(route) -> list[tuple[str, int, int]]:
    return [(s.peer_id, s.start, s.end) for s in route]


def test_one_long_span_wins_when_hops_cost_more_than_its_slower_compute():
    # "big" holds all 12 blocks at 60 block-steps/s: 0.2 s of compute, one 10 ms link.
    # three fast servers at 120 block-steps/s: 0.1 s of compute, but three 50 ms links
    spans = swarm(span("big", 0, 12, 60.0), span("f1", 0, 4, 120.0), span("f2", 4, 8, 120.0), span("f3", 8, 12, 120.0))
    near = {"big": 0.01, "f1": 0.05, "f2": 0.05, "f3": 0.05}
    model = LatencyModel(near)
    assert peers(make_route(spans, 0, 12, model=model)) == [("big", 0, 12)]
    assert model.chain_time([spans["big"]]) == pytest.approx(0.01 + 0.2)


def test_three_hops_win_when_they_are_faster():
    spans = swarm(span("big", 0, 12, 20.0), span("f1", 0, 4, 120.0), span("f2", 4, 8, 120.0), span("f3", 8, 12, 120.0))
    model = LatencyModel({"big": 0.01, "f1": 0.01, "f2": 0.01, "f3": 0.01})  # 0.61 s vs 0.13 s
    assert peers(make_route(spans, 0, 12, model=model)) == [("f1", 0, 4), ("f2", 4, 8), ("f3", 8, 12)]


def test_slow_replica_and_full_cache_are_avoided():
    spans = swarm(
        span("a_near", 0, 4),
        span("a_far", 0, 4),
        span("b_full", 4, 8, cache_tokens_left=10),
        span("b_room", 4, 8, 50.0, cache_tokens_left=10_000),
    )
    model = LatencyModel({"a_near": 0.002, "a_far": 0.2, "b_full": 0.002, "b_room": 0.002}, needed_tokens=512)
    assert peers(make_route(spans, 0, 8, model=model)) == [("a_near", 0, 4), ("b_room", 4, 8)]
    # the full server is still used when nothing else covers its blocks
    alone = swarm(spans["a_near"], spans["b_full"])
    route = make_route(alone, 0, 8, model=model)
    assert peers(route) == [("a_near", 0, 4), ("b_full", 4, 8)]
    assert model.chain_time(route) > CACHE_PENALTY


def test_loaded_server_counts_as_slower():
    spans = swarm(span("busy", 0, 4, 100.0, load=0.9), span("idle", 0, 4, 40.0))
    assert peers(make_route(spans, 0, 4, model=LatencyModel({}))) == [("idle", 0, 4)]


def test_push_uses_announced_server_to_server_pings():
    # with push, a -> b2 is a 2 ms hop (announced by a), a -> b1 unknown (estimated via the client)
    a = span("a", 0, 4, next_pings={"b2": 0.002})
    spans = swarm(a, span("b1", 4, 8), span("b2", 4, 8))
    rtts = {"a": 0.05, "b1": 0.04, "b2": 0.05}
    assert peers(make_route(spans, 0, 8, model=LatencyModel(rtts, push=False)))[1][0] == "b1"
    assert peers(make_route(spans, 0, 8, model=LatencyModel(rtts, push=True)))[1][0] == "b2"


def _brute_force(spans, start, end, model) -> float:
    """The least chain_time over every chain of cuts at span starts (small swarms only)."""
    best = float("inf")
    cuts = sorted({start, end} | {s.start for s in spans.values() if start < s.start < end})
    for k in range(1, len(cuts)):
        for inner in itertools.combinations(cuts[1:-1], k - 1):
            bounds = [start, *inner, end]
            options = [
                [s.cut(lo, hi) for s in spans.values() if s.start <= lo and hi <= s.end] for lo, hi in zip(bounds, bounds[1:])
            ]
            for chain in itertools.product(*options):
                if all(x.peer_id != y.peer_id for x, y in zip(chain, chain[1:])):
                    best = min(best, model.chain_time(list(chain)))
    return best


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("push", [False, True])
def test_planner_is_exact_on_small_swarms(seed: int, push: bool):
    rng = random.Random(seed)
    spans = {}
    for i in range(7):
        start = rng.randrange(0, 10)
        end = rng.randrange(start + 1, 11)
        pings = {f"s{j}": rng.uniform(0.001, 0.05) for j in range(7) if rng.random() < 0.5}
        spans[f"s{i}"] = span(f"s{i}", start, end, rng.uniform(20, 200), load=rng.uniform(0, 0.8), next_pings=pings)
    spans["full"] = span("full", 0, 10, rng.uniform(5, 50))  # some route always exists
    model = LatencyModel({p: rng.uniform(0.001, 0.1) for p in spans}, push=push)
    route = make_route(spans, 0, 10, model=model)
    assert route[0].start == 0 and route[-1].end == 10
    assert all(x.end == y.start for x, y in zip(route, route[1:]))
    assert model.chain_time(route) == pytest.approx(_brute_force(spans, 0, 10, model))


def test_no_route_names_the_missing_block():
    with pytest.raises(NoRouteError, match="block 4"):
        make_route(swarm(span("a", 0, 4), span("b", 5, 8)), 0, 8)
    with pytest.raises(NoRouteError, match="block 3"):
        make_training_route(swarm(span("a", 0, 3)), 0, 8)


def test_training_routes_spread_by_throughput_and_load():
    rng = random.Random(0)
    equal = swarm(span("a", 0, 8), span("b", 0, 8))
    counts = Counter(make_training_route(equal, 0, 8, rng=rng)[0].peer_id for _ in range(2000))
    assert 0.45 < counts["a"] / 2000 < 0.55
    skewed = swarm(span("a", 0, 8, 300.0), span("b", 0, 8, 100.0, load=0.5))  # weights 300 : 50
    counts = Counter(make_training_route(skewed, 0, 8, rng=rng)[0].peer_id for _ in range(2000))
    assert 0.8 < counts["a"] / 2000 < 0.92
    assert peers(make_training_route(swarm(span("a", 0, 3), span("b", 2, 8)), 0, 8, banned={"x"}, rng=rng)) == [
        ("a", 0, 3),
        ("b", 3, 8),
    ]
