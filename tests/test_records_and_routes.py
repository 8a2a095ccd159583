"""Record schema, span computation, block choice and route planning: no network at all."""

from __future__ import annotations

import pytest
from hivemind.utils.timed_storage import ValueWithExpiration

from petals_like.data_structures import RemoteSpanInfo, ServerInfo, ServerState, parse_block_range
from petals_like.dht.announce import signed_entries
from petals_like.dht.identity import Identity, peer_id_of
from petals_like.dht.records import compute_spans, default_dht_prefix, parse_block_entries
from petals_like.routing.planner import NoRouteError, make_route

ONLINE = ServerState.ONLINE


def info(start: int, end: int, state: ServerState = ONLINE, throughput: float = 1.0) -> ServerInfo:
    return ServerInfo(state, start, end, throughput=throughput)


def test_record_round_trip_and_unknown_fields_ignored():
    original = ServerInfo(ONLINE, 2, 5, throughput=3.5, adapters=("a",), next_pings={"peer": 0.01}, public_name="x")
    record = original.to_record()
    record["field_from_the_future"] = [1, 2, 3]
    assert ServerInfo.from_record(record) == original


def test_record_with_missing_optional_fields_gets_defaults():
    assert ServerInfo.from_record({"state": 2, "start_block": 0, "end_block": 1}) == info(0, 1, throughput=0.0)


@pytest.mark.parametrize(
    "record",
    [
        None,
        [],
        "x",
        {"state": 2},
        {"state": 7, "start_block": 0, "end_block": 1},
        {"state": 2, "start_block": 3, "end_block": 3},
        {"state": 2, "start_block": -1, "end_block": 3},
        {"state": 2, "start_block": 0, "end_block": 10**9},
        {"state": 2, "start_block": 0, "end_block": 2, "throughput": -1.0},
        {"state": 2, "start_block": 0, "end_block": 2, "throughput": float("nan")},
        {"state": 2, "start_block": 0, "end_block": 2, "throughput": "fast"},
        {"state": 2, "start_block": 0, "end_block": 2, "public_name": "x" * 10_000},
        {"state": 2, "start_block": 0, "end_block": 2, "adapters": list(range(1000))},
        {"state": 2, "start_block": 0, "end_block": 2, "next_pings": {"p": -5}},
    ],
)
def test_hostile_records_are_rejected(record):
    with pytest.raises(ValueError):
        ServerInfo.from_record(record)


def test_parse_block_entries_skips_bad_and_misplaced_records(caplog):
    raw = {
        "good": info(0, 4).to_record(),
        "bad": {"state": "online"},
        "elsewhere": info(5, 8).to_record(),  # claims a span that does not contain block 2
    }
    assert set(parse_block_entries(raw, 2)) == {"good"}
    assert "Ignoring record" in caplog.text


def test_only_signed_dictionary_entries_are_read():
    """What a node returns is read as entries only when it is a dictionary of entries under subkeys signed by
    the peer they name: a plain value of any shape (even a dict keyed by signed subkeys) yields nothing."""
    me, other = Identity(), Identity()
    try:
        peer, record = peer_id_of(me.public_key), info(0, 4).to_record()
        entry = ValueWithExpiration(record, 1.0)
        found = ValueWithExpiration({me.owner_subkey(peer): entry, peer: entry, 5: entry, other.owner_subkey(peer): entry}, 1.0)
        assert signed_entries(found, "m.0") == {peer: record}
        for plain in ({me.owner_subkey(peer): record}, ["not", "a", "map"], "text"):
            assert signed_entries(ValueWithExpiration(plain, 1.0), "m.0") == {}
        assert signed_entries(None, "m.0") == {}
    finally:
        me.close()
        other.close()


def test_compute_spans_joins_consecutive_blocks_and_skips_joining():
    a, b, c = info(0, 3), info(2, 4), info(0, 4, ServerState.JOINING)
    blocks = [{"a": a, "c": c}, {"a": a, "c": c}, {"a": a, "b": b, "c": c}, {"b": b, "c": c}]
    spans = compute_spans(blocks)
    assert {p: (s.start, s.end) for p, s in spans.items()} == {"a": (0, 3), "b": (2, 4)}


def test_default_dht_prefix():
    assert default_dht_prefix("meta-llama/Llama-2-7b-hf") == "Llama-2-7b-hf"
    assert default_dht_prefix("/tmp/x/tiny.llama/") == "tiny-llama"


def test_parse_block_range():
    assert parse_block_range("3:5", 8) == (3, 5)
    for bad in ("5:3", "3:3", "1:9", "a:b", "3"):
        with pytest.raises(ValueError):
            parse_block_range(bad, 8)


def spans_of(**ranges: tuple[int, int]) -> dict[str, RemoteSpanInfo]:
    return {p: RemoteSpanInfo(p, s, e, info(s, e)) for p, (s, e) in ranges.items()}


def test_route_covers_all_blocks_with_fewest_hops():
    spans = spans_of(a=(0, 3), b=(3, 8), c=(0, 6), d=(6, 8))
    route = make_route(spans, 0, 8)  # equal servers and links: the fewest hops is the fastest
    assert len(route) == 2 and route[0].start == 0 and route[0].end == route[1].start and route[1].end == 8


def test_route_avoids_banned_peers_and_cuts_spans():
    spans = spans_of(a=(0, 8), b=(0, 4), c=(4, 8))
    assert [s.peer_id for s in make_route(spans, 2, 6, banned={"a"})] == ["b", "c"]
    assert [(s.start, s.end) for s in make_route(spans, 2, 6)] == [(2, 6)]


def test_route_fails_clearly_on_a_gap():
    with pytest.raises(NoRouteError, match="block 4"):
        make_route(spans_of(a=(0, 4), b=(5, 8)), 0, 8)


def test_allowed_and_blocked_servers_are_sets_of_peer_ids():
    from petals_like.config import ClientConfig, ServerConfig

    config = ClientConfig(allowed_servers=["a", "b", "a"], blocked_servers=("c",))
    assert config.allowed_servers == {"a", "b"} and config.blocked_servers == {"c"}
    assert ClientConfig().allowed_servers is None
    with pytest.raises(TypeError):
        ClientConfig(allowed_servers="QmOnePeer")  # a string is not a collection of peer ids
    with pytest.raises(ValueError):
        ServerConfig(model="m", expiration=7200)  # other nodes would refuse its records
