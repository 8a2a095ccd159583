"""SwarmNode: one libp2p daemon and one DHT node on a private event-loop thread.

Servers and clients both talk to the swarm through it: the DHT node and the RPC handlers share the
daemon (one p2pd per process, not one per role), and synchronous code reaches the loop with run().
Its RSA identity (dht/identity.py) is the daemon's peer id and signs the records it stores; every
node checks the signature and the schema (dht/records.py) of records it is asked to store or receives.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P

from petals_like.dht import guards
from petals_like.dht.identity import Identity
from petals_like.dht.records import SwarmValidator

logger = logging.getLogger(__name__)

T = TypeVar("T")


class SwarmNode:
    def __init__(
        self,
        initial_peers: Sequence[str] = (),
        *,
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        client_mode: bool = False,
        identity_path: Optional[str] = None,
        start_timeout: float = 60.0,
        name: str = "swarm",
    ):
        self.client_mode = client_mode
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"{name}-loop", daemon=True)
        self._thread.start()
        self.p2p: Optional[P2P] = None
        self.dht: Optional[DHTNode] = None
        self.identity: Optional[Identity] = None
        try:
            self.identity = Identity(identity_path)
            self.run(self._start(initial_peers, host_maddrs, announce_maddrs), timeout=start_timeout)
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
        self.dht = await DHTNode.create(
            p2p=self.p2p,
            record_validator=SwarmValidator(self.identity.private_key),
            initial_peers=list(initial_peers),
            client_mode=self.client_mode,
            num_workers=8,
            # a lone bootstrap node has no peers yet; joining peers must reach theirs
            ensure_bootstrap_success=bool(initial_peers),
            cache_locally=False, cache_nearest=0, cache_on_store=False,  # no cache: see storage.NoCache
        )
        guards.install(self.dht.protocol)  # see dht/guards.py; nothing has awaited since create() returned

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
