"""Where a node listens, what it announces, and whether other hosts can dial it.

Listening. A server or DHT node started without --host_maddrs listens on every interface, IPv4 and
IPv6, TCP and QUIC, on one port (--port, or a free one). It announces that port on the addresses of
its own interfaces minus loopback and link-local ones (or --public_ip / --announce_maddrs), so what
other hosts read about it is dialable from where they are. Clients only dial out.

Reachability. A node behind NAT listens too, but nobody outside can open a connection to it. When a
server joins, it asks a few DHT nodes to dial it back (RPC_DIAL_BACK): each opens a TCP connection
to the address it sees the request come from, on the ports the server listens on, and checks that a
libp2p listener answers (the multistream-select header). Any success: the server is public. All
answers negative: it is private and uses a relay (dht/relay.py). No answer: assumed public.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import random
import socket
from typing import Any, Optional, Sequence

import msgpack
import psutil
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)

RPC_DIAL_BACK = "petals_like.dial_back"
MULTISTREAM = b"/multistream/1.0.0\n"
DIAL_TIMEOUT = 3.0  # seconds for one dial-back connection
MAX_PORTS = 4  # ports one dial-back request may name (one per transport at most)
CHECKERS = 3  # peers asked to dial back


# ---- addresses


def listen_plan(
    port: int = 0, public_ip: Optional[str] = None, announce_maddrs: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """(host_maddrs, announce_maddrs) for a node reachable from other hosts: every interface on one port."""
    port = port or free_port()
    host = [f"/ip4/0.0.0.0/tcp/{port}", f"/ip4/0.0.0.0/udp/{port}/quic-v1"]
    if _ipv6_works():
        host += [f"/ip6/::/tcp/{port}", f"/ip6/::/udp/{port}/quic-v1"]
    if announce_maddrs:
        return host, list(announce_maddrs)
    ips = [public_ip] if public_ip else interface_ips()
    announce = []
    for ip in ips:
        family = "ip6" if ipaddress.ip_address(ip).version == 6 else "ip4"
        announce += [f"/{family}/{ip}/tcp/{port}", f"/{family}/{ip}/udp/{port}/quic-v1"]
    return host, announce  # empty (no interface but loopback): libp2p announces what it listens on


def interface_ips() -> list[str]:
    """This host's addresses other hosts may reach: neither loopback nor link-local."""
    ips = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(addr.address.split("%")[0])
            if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
                ips.append(str(ip))
    return ips


def free_port(attempts: int = 50) -> int:
    """A port free for TCP and UDP on all interfaces (and on IPv6 where it works)."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0", 0))
            port = s.getsockname()[1]
        if all(_can_bind(family, kind, port) for family, kind in _bindings()):
            return port
    raise OSError(errno.EADDRINUSE, "no port is free for both TCP and UDP")


def _bindings() -> list[tuple[int, int]]:
    families = [socket.AF_INET] + ([socket.AF_INET6] if _ipv6_works() else [])
    return [(f, k) for f in families for k in (socket.SOCK_STREAM, socket.SOCK_DGRAM)]


def _can_bind(family: int, kind: int, port: int) -> bool:
    try:
        with socket.socket(family, kind) as s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        return True
    except OSError:
        return False


def _ipv6_works() -> bool:
    return socket.has_ipv6 and _can_bind(socket.AF_INET6, socket.SOCK_STREAM, 0)


def only_loopback(maddrs: Sequence[str]) -> bool:
    """True if a node listening on these is reachable from its own host only (a local swarm)."""
    for maddr in maddrs:
        parts = str(maddr).strip("/").split("/")
        if len(parts) < 2 or parts[0] not in ("ip4", "ip6") or not ipaddress.ip_address(parts[1]).is_loopback:
            return False
    return bool(maddrs)


def tcp_ports(maddrs: Sequence[str]) -> list[int]:
    ports = set()
    for maddr in maddrs:
        parts = str(maddr).strip("/").split("/")
        if len(parts) >= 4 and parts[2] == "tcp" and "p2p-circuit" not in parts:
            ports.add(int(parts[3]))
    return sorted(ports)


class WireAddr:
    """A multiaddr as p2pd's control protocol reads it.

    hivemind's Multiaddr encodes a /p2p/ peer id as a CID, which go-libp2p refuses in CONNECT requests
    ("length greater than remaining number of bytes in buffer"); here it is the bare multihash."""

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text

    def to_bytes(self) -> bytes:
        parts, out, plain = self.text.strip("/").split("/"), b"", []
        i = 0
        while i < len(parts):
            if parts[i] in ("p2p", "ipfs", "p2p-circuit"):
                if plain:
                    out += Multiaddr("/" + "/".join(plain)).to_bytes()
                    plain = []
                if parts[i] == "p2p-circuit":
                    out += _uvarint(290)
                    i += 1
                    continue
                multihash = PeerID.from_base58(parts[i + 1]).to_bytes()
                out += _uvarint(421) + _uvarint(len(multihash)) + multihash
                i += 2
            else:
                plain.append(parts[i])
                i += 1
        if plain:
            out += Multiaddr("/" + "/".join(plain)).to_bytes()
        return out


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def parse_maddr(addr: Any) -> Optional[tuple[str, Optional[str]]]:
    """A record's address as (its dialable part, the relay's peer id if it is a relay circuit), or None if it
    is not an IP / DNS address with a TCP or UDP (QUIC) port, optionally behind /p2p/<relay>/p2p-circuit."""
    if not isinstance(addr, str) or len(addr) > 300:
        return None
    parts, relay = addr.strip("/").split("/"), None
    if "p2p-circuit" in parts:
        if len(parts) < 3 or parts[-1] != "p2p-circuit" or parts[-3] != "p2p":
            return None
        relay, parts = parts[-2], parts[:-3]
        try:
            PeerID.from_base58(relay)
        except Exception:
            return None
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[2] not in ("tcp", "udp"):
        return None
    if not parts[3].isdigit() or not 0 < int(parts[3]) < 65536 or parts[4:] not in ([], ["quic-v1"]):
        return None
    if parts[0] in ("ip4", "ip6"):
        try:
            ipaddress.ip_address(parts[1])
        except ValueError:
            return None
    return "/" + "/".join(parts), relay


async def connection_maddr(p2p: P2P, peer: PeerID) -> Optional[str]:
    """The multiaddr of a direct connection to `peer`: where it listens if we dialed it, where its
    connection came from (the address its NAT shows) if it dialed us. None if not connected directly."""
    for info in await p2p._client.list_peers():
        if info.peer_id == peer:
            for addr in map(str, info.addrs):
                if "p2p-circuit" not in addr and addr.split("/")[1:2] in (["ip4"], ["ip6"]):
                    return addr
    return None


async def connection_ip(p2p: P2P, peer: PeerID) -> Optional[str]:
    maddr = await connection_maddr(p2p, peer)
    return None if maddr is None else maddr.split("/")[2]


# ---- the dial-back check


async def serve_dial_back(p2p: P2P) -> None:
    """Answer other nodes' RPC_DIAL_BACK: dial the address their request came from, on ports they name."""
    busy = asyncio.Semaphore(8)  # checks at once: each costs a few sockets for up to DIAL_TIMEOUT

    async def handler(request: bytes, remote_id: PeerID) -> bytes:
        ports = msgpack.unpackb(request, raw=False).get("ports", [])
        if not isinstance(ports, list) or not all(isinstance(p, int) and 0 < p < 65536 for p in ports[:MAX_PORTS]):
            raise ValueError("ports must be a list of TCP ports")
        ip = await connection_ip(p2p, remote_id)
        if ip is None:
            return msgpack.packb({"reachable": None, "ip": None})
        async with busy:
            results = await asyncio.gather(*(dial(ip, port) for port in ports[:MAX_PORTS]))
        return msgpack.packb({"reachable": any(results), "ip": ip})

    await p2p._client.add_unary_handler(RPC_DIAL_BACK, handler)


async def dial(ip: str, port: int, timeout: float = DIAL_TIMEOUT) -> bool:
    """True if a libp2p listener answers at ip:port (it speaks multistream-select first or in reply)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(_uvarint(len(MULTISTREAM)) + MULTISTREAM)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(64), timeout)
        return MULTISTREAM.strip() in data
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()


async def check_reachability(
    p2p: P2P, peers: Sequence[PeerID], ports: Sequence[int], *, timeout: float = 2 * DIAL_TIMEOUT + 2
) -> tuple[Optional[bool], set[str]]:
    """Ask up to CHECKERS of `peers` to dial us back on our TCP `ports`: (True if any reached us, False if
    all who answered could not, None if nobody answered or there is no TCP port to try; the addresses
    the peers that reached us saw us coming from)."""
    peers = list(peers)
    random.shuffle(peers)
    request = msgpack.packb({"ports": list(ports)[:MAX_PORTS]})

    async def ask(peer: PeerID) -> dict:
        try:
            answer = msgpack.unpackb(
                await asyncio.wait_for(p2p._client.call_unary_handler(peer, RPC_DIAL_BACK, request), timeout), raw=False
            )
            return answer if isinstance(answer, dict) and isinstance(answer.get("reachable"), bool) else {}
        except Exception as e:
            logger.debug(f"Dial-back check by {peer} failed: {e!r}")
            return {}

    if not ports:
        return None, set()
    answers = [a for a in await asyncio.gather(*(ask(peer) for peer in peers[:CHECKERS])) if a]
    if not answers:
        return None, set()
    seen = {a["ip"] for a in answers if a["reachable"] and isinstance(a.get("ip"), str)}
    return any(a["reachable"] for a in answers), seen
