"""Addresses, the dial-back check and the relay, on 127.0.0.1 (tests/test_netbed.py does it across NAT)."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from hivemind.p2p import P2P, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from petals_like.data_structures import ServerInfo, ServerState
from petals_like.dht.reach import WireAddr, check_reachability, dial, listen_plan, only_loopback, serve_dial_back, tcp_ports
from petals_like.dht.relay import (
    MAX_ROUTES,
    RelayingClient,
    RelayLimits,
    RelayService,
    Routes,
    UnreachableError,
    circuit_addr,
    parse_route,
    relay_info,
    reserve,
)

LOCAL = ["/ip4/127.0.0.1/tcp/0"]


def test_listen_plan_listens_everywhere_and_announces_no_loopback():
    host, announce = listen_plan(0)
    port = tcp_ports(host)[0]
    assert f"/ip4/0.0.0.0/tcp/{port}" in host and f"/ip4/0.0.0.0/udp/{port}/quic-v1" in host
    assert not any("/127." in a or "/::1/" in a for a in announce)
    assert all(f"/{port}" in a for a in announce)
    assert listen_plan(4001, public_ip="10.1.2.3")[1] == ["/ip4/10.1.2.3/tcp/4001", "/ip4/10.1.2.3/udp/4001/quic-v1"]
    assert listen_plan(4001, announce_maddrs=["/ip4/10.9.9.9/tcp/5"])[1] == ["/ip4/10.9.9.9/tcp/5"]
    assert only_loopback(LOCAL) and not only_loopback(host) and not only_loopback([])


def test_wire_addr_encodes_peer_ids_as_go_libp2p_reads_them():
    peer = "QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"
    raw = WireAddr(circuit_addr("/ip4/1.2.3.4/tcp/1", peer)).to_bytes()
    from hivemind.p2p import PeerID

    multihash = PeerID.from_base58(peer).to_bytes()
    # /ip4 (4) 1.2.3.4, /tcp (6) 1, /p2p (421 = a5 03) <length> <multihash>, /p2p-circuit (290 = a2 02)
    assert raw == bytes.fromhex("0401020304060001a503") + bytes([len(multihash)]) + multihash + bytes.fromhex("a202")


def test_routes_parse_direct_and_relay_addresses_and_drop_malformed_ones():
    relay = "QmSoLnSGccFuZQJzRadHn95W2CrSFmZuTdDWP8HXaHca9z"
    good = ["/ip4/10.0.0.2/tcp/5", "/ip6/fd00::2/udp/5/quic-v1", circuit_addr("/ip4/10.0.0.1/tcp/7", relay)]
    bad = [
        "/ip4/10.0.0.2/tcp/0",
        "/ip4/not-an-ip/tcp/5",
        "/unix/tmp/socket",
        "/ip4/10.0.0.2/tcp/5/ws",
        circuit_addr("/ip4/10.0.0.1/tcp/7", "not-a-peer-id"),
        "/ip4/10.0.0.1/tcp/7/p2p-circuit",
        "x" * 400,
    ]
    route = parse_route(good + bad, using_relay=True)
    assert route.addrs == tuple(good[:2]) and route.relays == ((relay, "/ip4/10.0.0.1/tcp/7"),)


def test_routes_remember_the_most_recent_peers_only():
    routes = Routes()
    for i in range(MAX_ROUTES + 10):
        routes.learn(f"peer-{i}", ["/ip4/10.0.0.2/tcp/5"], using_relay=False)
    routes.learn("peer-0", ["/ip4/10.0.0.3/tcp/5"], using_relay=False)  # learned again: kept as the newest
    assert len(routes.peers) == MAX_ROUTES and "peer-0" in routes.peers and "peer-1" not in routes.peers


def test_server_info_carries_relay_fields_and_refuses_bad_ones():
    info = ServerInfo(ServerState.ONLINE, 0, 4, using_relay=True, addrs=("/ip4/10.0.0.1/tcp/7/p2p/Qm/p2p-circuit",))
    assert ServerInfo.from_record(info.to_record()) == info
    for bad in ({"using_relay": "yes"}, {"addrs": ["not a multiaddr"]}, {"addrs": ["/ip4/1.2.3.4/tcp/1"] * 9}):
        with pytest.raises(ValueError):
            ServerInfo.from_record({**info.to_record(), **bad})


@pytest.fixture
def nodes():
    """relay, target (behind an imagined NAT) and caller: three daemons on 127.0.0.1, one event loop."""
    loop = asyncio.new_event_loop()
    created: list[P2P] = []

    async def make(n: int) -> list[P2P]:
        first = await P2P.create(host_maddrs=LOCAL)
        created.append(first)
        peers = [str(m) for m in await first.get_visible_maddrs()]
        for _ in range(n - 1):
            created.append(await P2P.create(initial_peers=peers, host_maddrs=LOCAL))
        return created

    yield loop, make
    for p2p in created:
        loop.run_until_complete(p2p.shutdown())
    loop.close()


def test_calls_and_streams_reach_a_relayed_peer_through_its_relay_within_limits(nodes):
    loop, make = nodes

    async def scenario() -> None:
        relay, target, caller, stranger = await make(4)
        service = await RelayService(relay, relay._client, RelayLimits(max_reservations=1)).start()
        failures = []

        async def echo(request, context):
            return runtime_pb2.ExpertResponse(metadata=request.metadata[::-1])

        async def fail(request, context):
            failures.append(context.remote_id)
            raise ValueError("the target's own 'error': no relay, cannot dial")  # words a relay failure has too

        await target.add_protobuf_handler("test.echo", echo, runtime_pb2.ExpertRequest)
        await target.add_protobuf_handler("test.fail", fail, runtime_pb2.ExpertRequest)
        routes = await relayed_stream_echo(relay, target, caller)

        with pytest.raises(Exception, match="no reservation"):  # not reserved yet: the relay refuses
            await caller.call_protobuf_handler(
                target.peer_id, "test.echo", runtime_pb2.ExpertRequest(metadata=b"ab"), runtime_pb2.ExpertResponse
            )
        assert await reserve(target, relay.peer_id)
        assert not await reserve(stranger, relay.peer_id)  # max_reservations=1
        answer = await caller.call_protobuf_handler(
            target.peer_id, "test.echo", runtime_pb2.ExpertRequest(metadata=b"abc"), runtime_pb2.ExpertResponse
        )
        assert answer.metadata == b"cba"
        with pytest.raises(P2PHandlerError, match="the target's own 'error'"):  # its own error text, as if direct
            await caller.call_protobuf_handler(
                target.peer_id, "test.fail", runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
            )
        assert len(failures) == 1  # delivered once: the target's error is an answer, not a relay failure
        replies = await caller.iterate_protobuf_handler(
            target.peer_id, "test.stream", _requests(b"x" * 300_000, 5), runtime_pb2.ExpertResponse
        )
        assert [len(r.metadata) async for r in replies] == [300_000] * 5
        stats = await relay_info(caller, relay.peer_id)
        assert stats["reservations"] == [target.peer_id.to_base58()] and stats["streams"] == 1
        assert stats["bytes"] >= 2 * 5 * 300_000 and stats["refused"] >= 2
        assert service.circuits.total() == 0  # the stream ended: its circuit was released

        routes.learn(target.peer_id.to_base58(), [], using_relay=True)  # behind NAT with no relay at all
        with pytest.raises(UnreachableError, match="no direct address and no relay"):
            await caller.call_protobuf_handler(
                target.peer_id, "test.echo", runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
            )

    loop.run_until_complete(asyncio.wait_for(scenario(), 60))


def test_dial_back_tells_a_listening_peer_from_a_closed_port(nodes):
    loop, make = nodes

    async def scenario() -> None:
        checker, asker = await make(2)
        await serve_dial_back(checker)
        port = tcp_ports([str(m) for m in await asker.get_visible_maddrs()])[0]
        assert await dial("127.0.0.1", port)
        reachable, seen = await check_reachability(asker, [checker.peer_id], [port])
        assert reachable is True and seen == {"127.0.0.1"}
        closed = _closed_port()
        assert not await dial("127.0.0.1", closed)
        assert await check_reachability(asker, [checker.peer_id], [closed]) == (False, set())
        assert await check_reachability(asker, [checker.peer_id], []) == (None, set())  # no TCP port: no verdict
        with pytest.raises(P2PHandlerError, match="ports must be"):
            await asker._client.call_unary_handler(checker.peer_id, "petals_like.dial_back", msgpack.packb({"ports": ["x"]}))

    loop.run_until_complete(asyncio.wait_for(scenario(), 60))


async def relayed_stream_echo(relay: P2P, target: P2P, caller: P2P) -> Routes:
    """The target serves "test.stream" (an echo); the caller knows it is reached through `relay`."""
    await target.add_protobuf_handler(
        "test.stream", _stream_echo, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
    )
    routes = Routes()
    caller._client = RelayingClient(caller._client, routes, caller.peer_id.to_base58())
    relay_maddr = str((await relay.get_visible_maddrs())[0]).split("/p2p/")[0]
    routes.learn(target.peer_id.to_base58(), [circuit_addr(relay_maddr, relay.peer_id.to_base58())], using_relay=True)
    return routes


async def _stream_echo(requests, context):
    async for request in requests:
        yield runtime_pb2.ExpertResponse(metadata=request.metadata)


async def _requests(payload: bytes, count: int):
    for _ in range(count):
        yield runtime_pb2.ExpertRequest(metadata=payload)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_relayed_stream_is_cut_at_its_byte_limit_and_its_circuit_released(nodes):
    loop, make = nodes

    async def scenario() -> None:
        relay, target, caller = await make(3)
        service = await RelayService(relay, relay._client, RelayLimits(max_circuit_bytes=1_000_000)).start()
        await relayed_stream_echo(relay, target, caller)
        assert await reserve(target, relay.peer_id)
        replies = await caller.iterate_protobuf_handler(
            target.peer_id, "test.stream", _requests(b"x" * 300_000, 5), runtime_pb2.ExpertResponse
        )
        received = []
        try:
            async for reply in replies:
                received.append(len(reply.metadata))
        except Exception:  # the cut stream ends or breaks, either way early
            pass
        assert len(received) < 5  # 3 MB both ways do not fit 1 MB
        for _ in range(50):
            if service.circuits.total() == 0:
                break
            await asyncio.sleep(0.1)
        assert service.circuits.total() == 0 and service.stats["cut"] == 1

    loop.run_until_complete(asyncio.wait_for(scenario(), 60))


def test_a_node_behind_nat_reserves_relays_announces_them_and_renews_them():
    from petals_like.dht.node import SwarmNode

    first = SwarmNode(name="public")
    second = SwarmNode(first.visible_maddrs(), name="public-2")
    hidden = None
    try:
        assert first.relay_service is not None and not first.using_relay  # public nodes relay for others
        peers = first.visible_maddrs() + second.visible_maddrs()
        hidden = SwarmNode(peers, force_reachability="private", max_relays=1, name="behind-nat")
        assert hidden.using_relay and hidden.dht.protocol.client_mode  # stores no keys for others
        (relay_id,) = hidden.relays
        relay = first if relay_id == first.peer_id else second
        (addr,) = hidden.record_addrs()
        assert addr.endswith(f"/p2p/{relay_id}/p2p-circuit") and "/tcp/" in addr
        assert PeerID.from_base58(hidden.peer_id) in relay.relay_service.reservations
        relay.shutdown()  # its relay is gone: the next round takes a slot on the other public node
        hidden.run(hidden.maintain_reachability(), timeout=60)
        (new_relay,) = hidden.relays
        assert (
            new_relay != relay_id
            and PeerID.from_base58(hidden.peer_id) in (first if relay is second else second).relay_service.reservations
        )
    finally:
        for node in (hidden, second, first):
            if node is not None:
                node.shutdown()


def test_a_relay_that_knows_its_target_is_relayed_reaches_it_directly_and_counts_circuits_at_once(nodes):
    loop, make = nodes

    async def scenario() -> None:
        relay, target, caller = await make(3)
        daemon = relay._client
        service = await RelayService(relay, daemon, RelayLimits(max_circuits=1)).start()
        routes = await relayed_stream_echo(relay, target, caller)
        relay._client = RelayingClient(daemon, Routes(peers=dict(routes.peers)), relay.peer_id.to_base58())
        assert await reserve(target, relay.peer_id)
        # the relay read the target's record too: it is "reached through" the relay itself, i.e. directly
        replies = await relay.iterate_protobuf_handler(
            target.peer_id, "test.stream", _requests(b"ab", 1), runtime_pb2.ExpertResponse
        )
        assert [r.metadata async for r in replies] == [b"ab"]
        # three streams opened at once through a relay of one circuit: one gets it, the others are refused
        opened = await asyncio.gather(
            *(caller._client.stream_open(target.peer_id, ("test.stream",)) for _ in range(3)), return_exceptions=True
        )
        assert sum(not isinstance(o, BaseException) for o in opened) == 1
        assert all("busy" in str(o) for o in opened if isinstance(o, BaseException)), opened
        for o in opened:
            if not isinstance(o, BaseException):
                o[2].close()
        assert service.stats["refused"] == 2

    loop.run_until_complete(asyncio.wait_for(scenario(), 60))
