"""LocalSwarm: a DHT and servers on 127.0.0.1, each its own process, for scripts that need a swarm.

    with LocalSwarm(model_dir, spans=["0:4", "4:8"]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.peers)

Every process it started is stopped when the block exits, whether by return, exception, Ctrl-C or
SIGTERM (turned into SystemExit while the swarm is up, so that the block's cleanup still runs).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from petals_like.cli.demo import LOCALHOST, Child, local_server_args

logger = logging.getLogger(__name__)

KEPT_OUTPUT_LINES = 100  # of each child, shown if it dies


class LocalSwarm:
    def __init__(
        self,
        model_dir: str | Path,
        spans: Sequence[str] = ("0:4", "4:8"),
        *,
        server_args: Sequence[str] = (),
        start_timeout: float = 300.0,
    ):
        """spans: one "A:B" per server. server_args: extra run_server arguments, e.g. ["--num_threads", "1"]."""
        if not spans:
            raise ValueError("a local swarm needs at least one server span")
        self.model_dir = Path(model_dir)
        self.spans = list(spans)
        self.server_args = list(server_args)
        self.start_timeout = start_timeout
        self.children: list[Child] = []
        self.peers: list[str] = []  # the DHT's multiaddrs: pass as initial_peers
        self.server_peer_ids: list[str] = []
        self.identities: dict[Child, str] = {}  # each server's identity name (see start_server)
        self._identity_dir: Optional[tempfile.TemporaryDirectory] = None
        self._previous_sigterm: Any = None

    def __enter__(self) -> LocalSwarm:
        self._catch_sigterm()
        # servers keep their identities here, not in a directory of their own that a killed one leaves behind
        self._identity_dir = tempfile.TemporaryDirectory(prefix="petals_like_swarm_")
        try:
            dht = self._start("run_dht", ["petals_like.cli.run_dht", "--host_maddrs", LOCALHOST])
            self.peers = dht.wait_for_line("--initial_peers", 60).split()[1:]
            self._drain(dht)
            servers = [self.start_server(span) for span in self.spans]
            for server in servers:  # they load in parallel; this waits for the slowest
                self.server_peer_ids.append(self.wait_ready(server))
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type: Optional[type] = None, *_: Any) -> None:
        try:
            if exc_type is not None:
                self._report_dead_children()
        finally:
            for child in reversed(self.children):
                child.stop()
            self.children.clear()
            self.identities.clear()
            if self._identity_dir is not None:
                self._identity_dir.cleanup()
                self._identity_dir = None
            self._restore_sigterm()

    def start_server(self, span: str, identity: Optional[str] = None) -> Child:
        """One more run_server process for blocks "A:B", joining this swarm; wait_ready() waits for it.

        identity: the name of its identity (peer id) in this swarm; a server started under the name of
        one that stopped comes back as that peer. Default: a new one.
        """
        identity = identity or f"server-{len(self.identities)}"
        identity_path = Path(self._identity_dir.name) / f"{identity}.key"
        extra = ["--identity_path", str(identity_path), *self.server_args]
        child = self._start(f"server {span}", local_server_args(self.model_dir, span, self.peers, *extra))
        self.identities[child] = identity
        return child

    def wait_ready(self, server: Child, timeout: Optional[float] = None) -> str:
        """Wait until a server serves; returns its peer id. Raises (and kills it) if it does not in time."""
        peer_id = server.wait_for_line("SERVER READY", self.start_timeout if timeout is None else timeout).split()[2]
        self._drain(server)
        return peer_id

    def kill(self, child: Child) -> None:
        """SIGKILL a child by its PID, as a crash: it announces nothing. Its process group (its p2pd) goes too."""
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()
        child.stop()  # the child is gone: this only kills what is left of its group
        with contextlib.suppress(ValueError):  # killed twice, by two threads
            self.children.remove(child)

    def _start(self, name: str, module_args: list[str]) -> Child:
        child = Child(name, [sys.executable, "-m", *module_args])
        self.children.append(child)  # appended before anything can fail, so that __exit__ stops it
        return child

    @staticmethod
    def _drain(child: Child) -> None:
        """Keep reading a child's output after it is ready: a full pipe would block the child's next write."""

        def drain() -> None:
            for line in child.process.stdout:
                child.output.append(line)
                if len(child.output) > 2 * KEPT_OUTPUT_LINES:
                    del child.output[:-KEPT_OUTPUT_LINES]

        threading.Thread(target=drain, name=f"drain {child.name}", daemon=True).start()

    def _report_dead_children(self) -> None:
        """A server that crashed is the likely cause of a client error; log its last words."""
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                tail = "".join(child.output[-30:])
                logger.error(f"{child.name} exited with code {code}; its last output:\n{tail}")

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
