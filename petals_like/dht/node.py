"""SwarmNode: one libp2p daemon and one DHT node on a private event-loop thread.

Servers and clients both talk to the swarm through it: the DHT node and the RPC handlers share the
daemon (one p2pd per process, not one per role), and synchronous code reaches the loop with run().
Its RSA identity (dht/identity.py) is the daemon's peer id and signs the records it stores; every
node checks the signature and the schema (dht/records.py) of records it is asked to store or receives.

Across hosts (dht/reach.py, dht/relay.py): without host_maddrs a node listens on every interface and
announces its interfaces' addresses; a node that may store keys for others first asks peers to dial it
back, and one that nobody can dial runs its DHT in client mode and serves through relays it reserves
on public peers. Public nodes answer dial-back checks and (with relay_limits) relay for others.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID

from petals_like.data_structures import MAX_ADDRS
from petals_like.dht import guards
from petals_like.dht.identity import Identity
from petals_like.dht.reach import check_reachability, connection_maddr, listen_plan, only_loopback, serve_dial_back, tcp_ports
from petals_like.dht.records import SwarmValidator
from petals_like.dht.relay import RelayingClient, RelayLimits, RelayService, Routes, circuit_addr, reserve

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SwarmNode:
    def __init__(
        self,
        initial_peers: Sequence[str] = (),
        *,
        host_maddrs: Optional[Sequence[str]] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        client_mode: bool = False,
        identity_path: Optional[str] = None,
        start_timeout: float = 60.0,
        name: str = "swarm",
        port: int = 0,
        public_ip: Optional[str] = None,
        force_reachability: Optional[str] = None,
        relay_limits: Optional[RelayLimits] = RelayLimits(),
        max_relays: int = 2,
    ):
        """host_maddrs=None: every interface on `port` (0: a free one), announcing public_ip or the interfaces'
        addresses unless announce_maddrs says otherwise. force_reachability: "public" or "private" instead of
        the dial-back check. relay_limits: offer relay service when public (None: never)."""
        if force_reachability not in (None, "public", "private"):
            raise ValueError(f"force_reachability must be public, private or None, got {force_reachability!r}")
        if host_maddrs is None:
            host_maddrs, announce_maddrs = listen_plan(port, public_ip, announce_maddrs)
        elif port or public_ip:
            raise ValueError("port and public_ip apply only without explicit host_maddrs")
        self.client_mode = client_mode
        self.announce_chosen = bool(announce_maddrs or public_ip)  # by the operator: announced as given
        self.host_maddrs, self.announce_maddrs = list(host_maddrs), list(announce_maddrs)
        self.observed_ips: set[str] = set()  # where peers that reached us saw us come from (dial-back)
        self.force_reachability, self.relay_limits, self.max_relays = force_reachability, relay_limits, max_relays
        self.routes = Routes()
        self.reachable: Optional[bool] = None  # None: not checked (a local swarm, or nobody answered)
        self.relays: dict[str, str] = {}  # relay peer id -> circuit address, while behind NAT
        self.relay_service: Optional[RelayService] = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"{name}-loop", daemon=True)
        self._thread.start()
        self.p2p: Optional[P2P] = None
        self.dht: Optional[DHTNode] = None
        self.identity: Optional[Identity] = None
        try:
            self.identity = Identity(identity_path)
            self.run(self._start(initial_peers, self.host_maddrs, self.announce_maddrs), timeout=start_timeout)
        except BaseException:
            self.shutdown()
            raise

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _start(self, initial_peers, host_maddrs, announce_maddrs) -> None:
        self.p2p = await P2P.create(
            initial_peers=list(initial_peers) or None,
            host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) or None,
            identity_path=self.identity.path,
            check_if_identity_free=not self.identity.fresh,  # a key made just now is nobody else's
            dht_mode="client" if self.client_mode else "server",
        )
        self.daemon = self.p2p._client  # hivemind's own client: what a relay forwards with (dht/relay.py)
        self.p2p._client = RelayingClient(self.daemon, self.routes, self.peer_id)  # calls to relayed peers go via relays
        self.initial_peer_ids = [
            PeerID.from_base58(m.split("/p2p/")[-1].split("/")[0]) for m in map(str, initial_peers) if "/p2p/" in m
        ]
        if not self.client_mode:
            await serve_dial_back(self.p2p)
            await self._check_reachability(self.initial_peer_ids)
            if self.reachable is False:
                await self._find_relays(self.initial_peer_ids)
            else:
                await self._offer_relay()
        self.dht = await DHTNode.create(
            p2p=self.p2p,
            record_validator=SwarmValidator(self.identity.private_key),
            initial_peers=list(initial_peers),
            client_mode=self.client_mode or self.reachable is False,  # others could not reach it to store
            num_workers=8,
            # a lone bootstrap node has no peers yet; joining peers must reach theirs
            ensure_bootstrap_success=bool(initial_peers),
            cache_locally=False,
            cache_nearest=0,
            cache_on_store=False,  # no cache: see storage.NoCache
        )
        guards.install(self.dht.protocol)  # see dht/guards.py; nothing has awaited since create() returned

    # ---- reachability and relays

    @property
    def using_relay(self) -> bool:
        return self.reachable is False

    def record_addrs(self) -> list[str]:
        """The addresses to announce in records: relay circuits behind NAT; else the direct ones, with the
        address peers saw us at first where it is none of ours (a 1:1 NAT, as cloud machines have)."""
        if self.using_relay:
            return list(self.relays.values())
        addrs = list(self.announce_maddrs)
        if not self.announce_chosen:
            own = {a.split("/")[2] for a in addrs}
            seen = [
                f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{port}"
                for ip in sorted(self.observed_ips - own)
                for port in tcp_ports(addrs)
            ]
            addrs = seen + addrs
        return addrs[:MAX_ADDRS]

    async def _check_reachability(self, peers: Sequence[PeerID]) -> None:
        """Set `reachable`: forced, or by asking peers to dial us back. A check nobody answers changes
        nothing once an answer was had (a NATed server must not announce addresses nobody can reach)."""
        if self.force_reachability is not None:
            self.reachable = self.force_reachability == "public"
            return
        if not peers or only_loopback(self.host_maddrs):
            return
        ports = tcp_ports([str(m) for m in await self.p2p.get_visible_maddrs()])  # the ports we really listen on
        reachable, self.observed_ips = await check_reachability(self.p2p, peers, ports)
        if reachable is not None or self.reachable is None:
            self.reachable = reachable
        verdicts = {
            True: "public",
            False: "behind NAT: serving through relays",
            None: "unknown (nobody answered), assumed public",
        }
        logger.info(f"Reachability: {verdicts[self.reachable]}")

    async def _offer_relay(self) -> None:
        if self.relay_limits is not None and self.relay_service is None:
            self.relay_service = await RelayService(self.p2p, self.daemon, self.relay_limits).start()

    async def _find_relays(self, candidates: Sequence[PeerID]) -> None:
        """Renew the slots held, and reserve new ones on candidates until max_relays are held."""
        for relay_id in list(self.relays):
            if not await reserve(self.p2p, PeerID.from_base58(relay_id)):
                del self.relays[relay_id]
        for peer in candidates:
            if len(self.relays) >= self.max_relays:
                break
            key = peer.to_base58()
            if key in self.relays or key == self.peer_id:
                continue
            maddr = await connection_maddr(self.p2p, peer)
            if maddr is not None and await reserve(self.p2p, peer):
                self.relays[key] = circuit_addr(maddr, key)
        if not self.relays:
            logger.warning("Behind NAT and no relay took a reservation: clients cannot reach this server")

    async def maintain_reachability(self, recheck: bool = False) -> None:
        """Called periodically by servers: renew relay slots (finding new relays if some left); with recheck,
        ask peers to dial back again and follow the answer (the DHT mode stays what it was at start)."""
        if self.client_mode:
            return
        known = list(self.dht.protocol.routing_table.peer_id_to_uid) if self.dht is not None else []
        if recheck:
            was = self.reachable
            await self._check_reachability(known + self.initial_peer_ids)
            if was is not False and self.reachable is False:
                logger.warning("This server is no longer reachable directly: serving through relays")
            if self.reachable is not False:
                self.relays.clear()
                await self._offer_relay()
        if self.reachable is False:
            await self._find_relays(self.initial_peer_ids + known)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    def visible_maddrs(self) -> list[str]:
        maddrs = self.run(self.p2p.get_visible_maddrs())
        return [str(m) for m in maddrs]

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Awaitable[T], timeout: Optional[float] = None) -> T:
        """Run a coroutine on the node's loop from another thread and wait for its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("SwarmNode.run() called from its own loop; await the coroutine instead")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"swarm call did not finish in {timeout} s") from None
        except BaseException:  # e.g. KeyboardInterrupt in the waiting thread: the coroutine stops too
            future.cancel()
            raise

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    async def _stop(self) -> None:
        if self.dht is not None:
            try:
                await asyncio.wait_for(self.dht.shutdown(), timeout=5)
            except Exception as e:  # the daemon is stopped below whatever happened here
                logger.debug(f"DHT node shutdown: {e!r}")
        if self.p2p is not None:
            await self.p2p.shutdown()
        # hivemind leaves background tasks (cache refresh, searches) behind; end them before the loop stops
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=2) if tasks else None

    def shutdown(self) -> None:
        """Stop the DHT node and the p2p daemon, then the loop. Safe to call twice."""
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=15)
        except Exception as e:
            logger.warning(f"Swarm node did not stop cleanly: {e!r}")
            if self.p2p is not None:
                self.p2p._terminate()  # last resort: never leave a p2pd daemon behind
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if self.identity is not None:
            self.identity.close()
