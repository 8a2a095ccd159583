"""LocalSwarm: a DHT and servers on 127.0.0.1, each its own process. The one launcher of local swarms:
the demo, the bench, the tests, and the soak and chaos runs all start theirs with it.

    with LocalSwarm(model_dir, spans=["0:4", "4:8"]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.peers)

Every process it started is stopped when the block exits, whether by return, exception, Ctrl-C or
SIGTERM (turned into SystemExit while the swarm is up, so that the block's cleanup still runs).
start() and stop() do the same without a with-block.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from petals_like.testing.processes import Child

logger = logging.getLogger(__name__)

LOCALHOST = "/ip4/127.0.0.1/tcp/0"
DHT_START_TIMEOUT = 60.0  # seconds for run_dht to print its multiaddrs


def run_server_args(model_dir: str | Path, span: str, peers: Sequence[str], *extra: str) -> list[str]:
    """`-m` arguments of a quiet run_server for blocks `span` on 127.0.0.1, joining `peers`."""
    return ["petals_like.cli.run_server", str(model_dir), "--block_indices", span, "--initial_peers", *peers,
            "--host_maddrs", LOCALHOST, "--no_progress", "--log_level", "WARNING", *extra]  # fmt: skip


class LocalSwarm:
    def __init__(
        self,
        model_dir: str | Path,
        spans: Sequence[str] = ("0:4", "4:8"),
        *,
        server_args: Sequence[str] = (),
        initial_peers: Sequence[str] = (),
        start_timeout: float = 300.0,
        on_ready: Callable[[str], None] = lambda line: None,
    ):
        """spans: one "A:B" per server started with the swarm. server_args: extra run_server arguments,
        e.g. ["--num_threads", "1"]. initial_peers: join the DHT of a swarm that runs already instead of
        starting one. start_timeout: seconds a server may take to serve. on_ready: called with each
        server's "SERVER READY" line."""
        if not spans and not initial_peers:
            raise ValueError("a local swarm needs at least one server span, or initial_peers to join")
        self.model_dir = Path(model_dir)
        self.spans = list(spans)
        self.server_args = list(server_args)
        self.start_timeout = start_timeout
        self.on_ready = on_ready
        self.children: list[Child] = []  # every process started and not killed, the DHT first
        self.dht: Optional[Child] = None
        self.peers: list[str] = list(initial_peers)  # the DHT's multiaddrs: pass as initial_peers
        self.server_peer_ids: list[str] = []  # of the servers of `spans`, in that order
        self.identities: dict[Child, str] = {}  # each server's identity name (see start_server)
        self._identity_dir: Optional[tempfile.TemporaryDirectory] = None
        self._previous_sigterm: Any = None

    @property
    def servers(self) -> list[Child]:
        """The server processes started and not killed, in the order they were started."""
        return [child for child in self.children if child is not self.dht]

    def start(self) -> LocalSwarm:
        """Start the DHT (unless initial_peers were given) and the servers of `spans`; returns once all serve."""
        self._catch_sigterm()
        # servers keep their identities here, not in a directory of their own that a killed one leaves behind
        self._identity_dir = tempfile.TemporaryDirectory(prefix="petals_like_swarm_")
        try:
            if not self.peers:
                self.dht = self._start("run_dht", ["petals_like.cli.run_dht", "--host_maddrs", LOCALHOST])
                self.peers = self.dht.wait_for_line("--initial_peers", DHT_START_TIMEOUT).split()[1:]
            self.server_peer_ids = self.add_servers(self.spans)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def stop(self) -> None:
        """Stop every process it started (by PID, with its process group). Safe to call twice."""
        try:
            for child in reversed(self.children):
                child.stop()
        finally:
            self.children.clear()
            self.identities.clear()
            if self._identity_dir is not None:
                self._identity_dir.cleanup()
                self._identity_dir = None
            self._restore_sigterm()

    def __enter__(self) -> LocalSwarm:
        return self.start()

    def __exit__(self, exc_type: Optional[type] = None, *_: Any) -> None:
        try:
            if exc_type is not None:
                self._report_dead_children()
        finally:
            self.stop()

    def add_servers(self, spans: Sequence[str]) -> list[str]:
        """A server per span, joining this swarm; returns their peer ids once all serve."""
        servers = [self.start_server(span) for span in spans]
        return [self.wait_ready(server) for server in servers]  # they load in parallel; this waits for the slowest

    def start_server(self, span: str, identity: Optional[str] = None) -> Child:
        """One more run_server process for blocks "A:B", joining this swarm; wait_ready() waits for it.

        identity: the name of its identity (peer id) in this swarm; a server started under the name of
        one that stopped comes back as that peer. Default: a new one.
        """
        identity = identity or f"server-{len(self.identities)}"
        identity_path = Path(self._identity_dir.name) / f"{identity}.key"
        extra = ["--identity_path", str(identity_path), *self.server_args]
        child = self._start(f"server {span}", run_server_args(self.model_dir, span, self.peers, *extra))
        self.identities[child] = identity
        return child

    def wait_ready(self, server: Child, timeout: Optional[float] = None) -> str:
        """Wait until a server serves; returns its peer id. Raises (and kills it) if it does not in time."""
        try:
            line = server.wait_for_line("SERVER READY", self.start_timeout if timeout is None else timeout)
        except RuntimeError:
            self.kill(server)
            raise
        self.on_ready(line)
        return line.split()[2]

    def kill(self, child: Child) -> None:
        """SIGKILL a child with its process group (its p2pd), as a crash: it announces nothing."""
        child.kill()
        with contextlib.suppress(ValueError):  # killed twice, by two threads
            self.children.remove(child)

    def _start(self, name: str, module_args: list[str]) -> Child:
        child = Child(name, [sys.executable, "-m", *module_args])
        self.children.append(child)  # appended before anything can fail, so that stop() stops it
        return child

    def _report_dead_children(self) -> None:
        """A server that crashed is the likely cause of a client error; log its last words."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                logger.error(f"{child.name} exited with code {code}; its last output:\n{child.tail()}")

    def _catch_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread

        def handler(signum: int, _frame: Any) -> None:
            raise SystemExit(128 + signum)

        self._previous_sigterm = signal.signal(signal.SIGTERM, handler)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
