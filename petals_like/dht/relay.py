"""Relays: how a server behind NAT serves, through a public peer it keeps a connection to.

A server that nobody can dial (dht/reach.py) reserves a slot on one or two public peers (RPC_RESERVE
over the connection it opened to them) and announces `using_relay` with one address per relay,
written as libp2p circuit addresses: /ip4/R/tcp/P/p2p/<relay>/p2p-circuit. Whoever calls that server
then sends the call to the relay, which forwards it over the server's own connection:

    unary calls  RPC_RELAY_UNARY   {t: target, n: protocol, d: request} -> b"\0" + the target's answer,
                                   or b"\1" + the target's own error text; a relay that could not deliver
                                   the call raises (the caller then tries its next relay)
    streams      RPC_RELAY_STREAM  header {t, n}, then one status byte (0: delivered, 1: refused + why),
                                   then the stream's bytes both ways

Why not libp2p's own circuits: the p2pd that hivemind ships grants circuit-v2 reservations with
libp2p's default limit (2 minutes and 128 KiB per direction per connection, whatever -relayDataLimit
says: measured), which cuts an inference session after a few hundred steps of a small model and
cannot carry one prompt of a large one. Each hop here is its own encrypted libp2p connection; the
relay sees the relayed messages, as the server itself does, and the client's spot checks cover both.

Limits (RelayLimits): slots, concurrent circuits (in all and per caller), bytes and seconds per circuit;
a public server offers the service unless started with --no_relay.

On the calling side RelayingClient wraps hivemind's daemon client: every call and stream to a peer
known to be relayed goes through one of its relays, and every first call to a peer with announced
direct addresses dials those addresses. Nothing above it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import msgpack
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID

from petals_like.dht.reach import WireAddr, parse_maddr

logger = logging.getLogger(__name__)

RPC_RESERVE = "petals_like.relay.reserve"
RPC_RELAY_UNARY = "petals_like.relay.unary"
RPC_RELAY_STREAM = "petals_like.relay.stream"
RPC_RELAY_INFO = "petals_like.relay.info"
RESERVATION_TTL = 300.0  # seconds a slot lasts unless renewed (servers renew with every announcement)
CONNECT_TTL = 60.0  # seconds a successful dial of a peer's announced addresses is trusted without redialing
MAX_HEADER = 1024
HEADER_TIMEOUT = 10.0  # seconds a caller has to say where its relayed stream goes, and a relay to answer
MAX_ROUTES = 4096  # peers whose routes a node remembers (the most recently learned)
# what tells a relay that failed (refused, or could not be dialed, or died) from the target's own answer
RELAY_FAILURES = (P2PHandlerError, P2PDaemonError, ConnectionError, asyncio.IncompleteReadError)
# a relayed server announces this share of its throughput: every step costs it one more hop, so routing
# prefers a direct server of equal compute, and balancing counts it as the weaker server it is to clients
RELAY_PENALTY = 0.2


class UnreachableError(ConnectionError):
    """A server no route leads to (no direct address that answers, and no relay)."""


@dataclass(frozen=True)
class RelayLimits:
    max_reservations: int = 128  # servers behind NAT one relay serves
    max_circuits: int = 256  # relayed calls and streams open at once, all callers together
    max_circuits_per_peer: int = 32  # ... of one caller
    max_circuit_bytes: int = 16 * 1024**3  # bytes one relayed stream may carry (both directions)
    max_circuit_seconds: float = 24 * 3600.0  # seconds one relayed stream may stay open


class RelayService:
    """The relay side: slots for servers behind NAT, and forwarding to them over their connections.

    `daemon` is hivemind's own daemon client, not a RelayingClient: a relay reaches the servers it
    relays for over the connections they opened to it, whatever their records say."""

    def __init__(self, p2p: P2P, daemon: Any, limits: RelayLimits = RelayLimits()):
        self.p2p, self.daemon, self.limits = p2p, daemon, limits
        self.reservations: dict[PeerID, float] = {}  # server -> expiry (monotonic)
        self.circuits: Counter = Counter()  # caller -> relayed calls and streams open now
        self.stats = Counter()  # unary calls, streams, bytes relayed, refusals, cut streams

    async def start(self) -> RelayService:
        await self.daemon.add_unary_handler(RPC_RESERVE, self._reserve)
        await self.daemon.add_unary_handler(RPC_RELAY_UNARY, self._unary)
        await self.daemon.add_unary_handler(RPC_RELAY_INFO, self._info)
        await self.p2p.add_binary_stream_handler(RPC_RELAY_STREAM, self._stream)
        return self

    def _purge(self) -> None:
        now = time.monotonic()
        for peer in [p for p, expiry in self.reservations.items() if expiry < now]:
            del self.reservations[peer]

    async def _reserve(self, request: bytes, remote_id: PeerID) -> bytes:
        self._purge()
        if remote_id not in self.reservations and len(self.reservations) >= self.limits.max_reservations:
            self._refuse(f"relay full: {self.limits.max_reservations} servers")
        self.reservations[remote_id] = time.monotonic() + RESERVATION_TTL
        return msgpack.packb({"ttl": RESERVATION_TTL})

    async def _info(self, request: bytes, remote_id: PeerID) -> bytes:
        self._purge()
        return msgpack.packb(
            {"reservations": [p.to_base58() for p in self.reservations], "circuits": self.circuits.total(), **self.stats}
        )

    def _refuse(self, why: str) -> None:
        self.stats["refused"] += 1
        raise RelayRefused(why)

    def _target(self, header: Any) -> tuple[PeerID, str]:
        if not isinstance(header, dict) or not isinstance(header.get("t"), str) or not isinstance(header.get("n"), str):
            self._refuse("bad relay header")
        target, name = PeerID.from_base58(header["t"]), header["n"]
        if name.startswith("petals_like.relay."):
            self._refuse("relays do not chain")
        self._purge()
        if target not in self.reservations:
            self._refuse(f"no reservation for {header['t']} on this relay")
        return target, name

    def _open(self, caller: PeerID) -> None:
        """Take a circuit for the caller, before anything is awaited (so concurrent calls count)."""
        if self.circuits.total() >= self.limits.max_circuits or self.circuits[caller] >= self.limits.max_circuits_per_peer:
            self._refuse("relay busy: too many relayed calls and streams")
        self.circuits[caller] += 1

    def _close(self, caller: PeerID) -> None:
        self.circuits[caller] -= 1
        if self.circuits[caller] <= 0:
            del self.circuits[caller]

    async def _unary(self, request: bytes, remote_id: PeerID) -> bytes:
        call = msgpack.unpackb(request, raw=False)
        target, name = self._target(call)
        data = call.get("d")
        if not isinstance(data, bytes):
            self._refuse("bad relay request")
        self._open(remote_id)
        try:
            answer = b"\x00" + await self.daemon.call_unary_handler(target, name, data)
        except P2PHandlerError as e:  # the target's handler raised: its own text goes back as an answer
            answer = b"\x01" + str(e).encode()
        except Exception as e:  # could not deliver: the caller tries another relay
            self._refuse(f"cannot reach {target.to_base58()[-6:]} from this relay: {e!r}")
        finally:
            self._close(remote_id)
        self.stats["unary"] += 1
        self.stats["bytes"] += len(data) + len(answer)
        return answer

    async def _stream(self, info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        caller, target_writer, opened = info.peer_id, None, False
        try:
            try:
                (size,) = struct.unpack("<I", await asyncio.wait_for(reader.readexactly(4), HEADER_TIMEOUT))
                if size > MAX_HEADER:
                    self._refuse("relay header too long")
                header = await asyncio.wait_for(reader.readexactly(size), HEADER_TIMEOUT)
                target, name = self._target(msgpack.unpackb(header, raw=False))
                self._open(caller)  # counted before the next await: concurrent streams see each other
                opened = True
                _, target_reader, target_writer = await asyncio.wait_for(self.daemon.stream_open(target, (name,)), HEADER_TIMEOUT)
            except Exception as e:
                writer.write(_status(str(e) or repr(e)))
                with contextlib.suppress(Exception):  # the caller may be gone already
                    await writer.drain()
                return
            writer.write(_status(None))
            self.stats["streams"] += 1
            budget = [self.limits.max_circuit_bytes]
            pipes = [
                asyncio.create_task(self._pipe(reader, target_writer, budget)),
                asyncio.create_task(self._pipe(target_reader, writer, budget)),
            ]
            done, _ = await asyncio.wait(pipes, timeout=self.limits.max_circuit_seconds, return_when=asyncio.FIRST_COMPLETED)
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)  # a closed end's error ends its pipe, nothing more
            if budget[0] < 0 or not done:
                self.stats["cut"] += 1  # over its bytes or its time: both ends are closed below
        finally:
            if opened:
                self._close(caller)
            for w in (writer, target_writer):
                if w is not None:
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: list[int]) -> None:
        while True:
            chunk = await reader.read(1 << 16)
            if not chunk:
                return
            budget[0] -= len(chunk)
            if budget[0] < 0:
                return
            self.stats["bytes"] += len(chunk)
            writer.write(chunk)
            await writer.drain()


class RelayRefused(Exception):
    pass


def _status(error: Optional[str]) -> bytes:
    if error is None:
        return b"\x00"
    text = error.encode()[:1000]
    return b"\x01" + struct.pack("<H", len(text)) + text


# ---- the calling side


@dataclass(frozen=True)
class PeerRoute:
    """How to reach one peer: its announced direct addresses, or its relays (peer id, relay's address)."""

    addrs: tuple[str, ...] = ()
    relays: tuple[tuple[str, str], ...] = ()
    using_relay: bool = False


def parse_route(addrs: Sequence[str], using_relay: bool) -> PeerRoute:
    """A record's addresses, keeping only well-formed ones: IP or DNS with a TCP / UDP port; a relay's
    circuit address must name the relay's peer id."""
    direct, relays = [], []
    for addr in addrs:
        parsed = parse_maddr(addr)
        if parsed is None:
            continue
        transport, relay_id = parsed
        if relay_id is None:
            direct.append(addr)
        else:
            relays.append((relay_id, transport))
    return PeerRoute(tuple(direct), tuple(relays), using_relay)


def circuit_addr(relay_maddr: str, relay_id: str) -> str:
    return f"{relay_maddr}/p2p/{relay_id}/p2p-circuit"


@dataclass
class Routes:
    """What this node knows of how to reach other peers (learned from their records; the last MAX_ROUTES)."""

    peers: dict[str, PeerRoute] = field(default_factory=dict)
    dialed: dict[str, float] = field(default_factory=dict)  # peer or relay -> when its addresses were dialed last
    failed: dict[str, float] = field(default_factory=dict)  # relay -> when a call through it failed last
    relayed_calls: Counter = field(default_factory=Counter)  # relay -> calls and streams it delivered

    def learn(self, peer_id: str, addrs: Iterable[str], using_relay: bool) -> None:
        route = parse_route(list(addrs), using_relay)
        if self.peers.get(peer_id) == route:
            return
        self.peers.pop(peer_id, None)  # re-inserted last: the oldest routes are forgotten first
        self.peers[peer_id] = route
        self.dialed.pop(peer_id, None)
        while len(self.peers) > MAX_ROUTES:
            self.dialed.pop(next(iter(self.peers)), None)
            del self.peers[next(iter(self.peers))]
        relays = {relay for route in self.peers.values() for relay, _ in route.relays}
        for table in (self.failed, self.relayed_calls):
            for relay in [r for r in table if r not in relays]:
                del table[relay]


class RelayingClient:
    """hivemind's daemon client, with calls to relayed peers sent through their relays (see above)."""

    def __init__(self, inner: Any, routes: Routes, own_id: str):
        self._inner = inner
        self.routes, self.own_id = routes, own_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def call_unary_handler(self, peer_id: PeerID, proto: str, data: bytes) -> bytes:
        relays = await self._prepare(peer_id)
        if relays is None:
            return await self._inner.call_unary_handler(peer_id, proto, data)
        request = msgpack.packb({"t": peer_id.to_base58(), "n": proto, "d": data}, use_bin_type=True)
        answer = await self._via_relays(relays, lambda relay: self._inner.call_unary_handler(relay, RPC_RELAY_UNARY, request))
        if answer[:1] != b"\x00":  # the target answered with an error: as if called directly
            raise P2PHandlerError(answer[1:].decode(errors="replace"))
        return answer[1:]

    async def stream_open(self, peer_id: PeerID, protocols: Sequence[str]) -> Any:
        relays = await self._prepare(peer_id)
        if relays is None:
            return await self._inner.stream_open(peer_id, protocols)
        header = msgpack.packb({"t": peer_id.to_base58(), "n": protocols[0]})

        async def through(relay: PeerID) -> Any:
            info, reader, writer = await self._inner.stream_open(relay, (RPC_RELAY_STREAM,))
            try:
                writer.write(struct.pack("<I", len(header)) + header)
                await writer.drain()
                if (await asyncio.wait_for(reader.readexactly(1), HEADER_TIMEOUT)) != b"\x00":
                    (size,) = struct.unpack("<H", await reader.readexactly(2))
                    why = (await reader.readexactly(size)).decode(errors="replace")
                    raise ConnectionError(f"relay {relay.to_base58()[-6:]}: {why}")
            except BaseException:
                writer.close()
                raise
            return info, reader, writer

        return await self._via_relays(relays, through)

    async def _prepare(self, peer_id: PeerID) -> Optional[list[tuple[str, str]]]:
        """The relays to reach the peer through (None: call it directly, after dialing its announced
        addresses if that has not been done lately)."""
        key = peer_id.to_base58()
        route = self.routes.peers.get(key)
        if route is None:
            return None
        if route.using_relay:
            if any(relay == self.own_id for relay, _ in route.relays):
                return None  # we relay for it: it keeps a connection to us
            if not route.relays:
                raise UnreachableError(f"server {key[-6:]} unreachable: no direct address and no relay")
            return sorted(route.relays, key=lambda relay: self.routes.failed.get(relay[0], 0.0))
        if route.addrs and time.monotonic() - self.routes.dialed.get(key, -CONNECT_TTL) >= CONNECT_TTL:
            try:
                await self._inner.connect(peer_id, [WireAddr(a) for a in route.addrs])
            except Exception as e:
                raise UnreachableError(f"server {key[-6:]} unreachable at {list(route.addrs)}: {e}") from None
            self.routes.dialed[key] = time.monotonic()
        return None

    async def _via_relays(self, relays: list[tuple[str, str]], call: Any) -> Any:
        """call(relay) through the first relay that delivers; the target's own answer or error ends it."""
        errors = []
        for relay_id, relay_maddr in relays:
            relay = PeerID.from_base58(relay_id)
            try:
                if time.monotonic() - self.routes.dialed.get(relay_id, -CONNECT_TTL) >= CONNECT_TTL:
                    await self._inner.connect(relay, [WireAddr(relay_maddr)])
                    self.routes.dialed[relay_id] = time.monotonic()
                result = await call(relay)
            except RELAY_FAILURES as e:
                errors.append(f"{relay_id[-6:]}: {e}")
                self.routes.dialed.pop(relay_id, None)
                self.routes.failed[relay_id] = time.monotonic()
                continue
            self.routes.relayed_calls[relay_id] += 1
            return result
        raise UnreachableError(f"server unreachable through its relays: {'; '.join(errors)}")


async def reserve(p2p: P2P, relay: PeerID, *, timeout: float = 10.0) -> bool:
    """Take or renew a slot on `relay` (over our own connection to it)."""
    try:
        await asyncio.wait_for(p2p._client.call_unary_handler(relay, RPC_RESERVE, b""), timeout)
        return True
    except Exception as e:
        logger.info(f"Relay {relay.to_base58()[-6:]} refused or failed a reservation: {e}")
        return False


async def relay_info(p2p: P2P, relay: PeerID, *, timeout: float = 10.0) -> dict:
    answer = await asyncio.wait_for(p2p._client.call_unary_handler(relay, RPC_RELAY_INFO, b""), timeout)
    return msgpack.unpackb(answer, raw=False)
