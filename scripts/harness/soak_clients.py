"""The client processes of a soak run (soak_worker.py): started, killed, replaced and stopped by
process group, their output turned into events, and every session they started accounted for.

Each client is a Child (petals_like/testing/processes.py) and so leads a process group of its own, with its
p2p daemon in it: SIGKILL to the group is a client machine vanishing, and what is still in the
group after a client stopped by itself is what it left behind.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from harness.soak_worker import EVENT_PREFIX
from petals_like.testing.processes import Child, live_in_groups

STOP_TIMEOUT = 90.0  # seconds for the clients to finish their generate() calls and exit after SIGTERM
MAX_CRASHES = 3  # clients that exit by themselves before the run gives up
KEPT_EXAMPLES = 5  # of lost or wrong sessions, in the report


@dataclass
class Tally:
    """What a soak run counts, the checks that failed, and examples of lost or wrong sessions."""

    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def example(self, text: str) -> None:
        if len(self.examples) < KEPT_EXAMPLES:
            self.examples.append(text)


class ClientProcess:
    """One soak_worker process; its output lines that are events go to `events` as they come."""

    def __init__(self, name: str, cmd: list[str], sessions: int, events: queue.Queue):
        self.name = name
        self.sessions = sessions  # a client started in its place runs as many
        self.open: set[str] = set()  # sessions started and not ended
        self.ready = False
        self.events = events
        self.child = Child(name, cmd, on_line=self._on_line)

    @property
    def pid(self) -> int:  # also its process group
        return self.child.pid

    def running(self) -> bool:
        return self.child.running()

    def _on_line(self, line: str) -> bool:
        if line.startswith(EVENT_PREFIX):
            with contextlib.suppress(ValueError):  # a line cut short by a kill is no event
                self.events.put((self, json.loads(line[len(EVENT_PREFIX) :])))
                return True
        return False


class ClientPool:
    """Runs `worker_cmd` (a soak_worker command without --sessions and --name) as client processes.

    Counts in the tally: "run" (sessions started), "clients_started", "kills", "clients_crashed",
    "clients_hung", "processes_left_by_clients", "dropped_with_client" (sessions of a killed
    client) and "lost" (sessions of a client that crashed or hung). Every "end" event goes to on_end.
    """

    def __init__(self, worker_cmd: list[str], tally: Tally, on_end: Callable[[dict], None]):
        self.worker_cmd = worker_cmd
        self.tally = tally
        self.on_end = on_end
        self.events: queue.Queue = queue.Queue()
        self.clients: list[ClientProcess] = []

    def start(self, sessions: int) -> None:
        name = f"c{self.tally.counts['clients_started']}"
        self.tally.counts["clients_started"] += 1
        self.clients.append(
            ClientProcess(name, [*self.worker_cmd, "--sessions", str(sessions), "--name", name], sessions, self.events)
        )

    def wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(c.ready for c in self.clients):
            if time.monotonic() > deadline:
                raise RuntimeError(f"client processes not ready in {timeout:.0f} s")
            self.handle_events(timeout=0.2)
            if not self.replace_crashed():
                raise RuntimeError("client processes exit before they are ready:\n" + "\n".join(self.tally.failures))

    def handle_events(self, timeout: float) -> None:
        """Handle every queued event, waiting up to `timeout` s for the first."""
        with contextlib.suppress(queue.Empty):
            first = self.events.get(timeout=timeout) if timeout else self.events.get_nowait()
            self._on_event(*first)
            while True:
                self._on_event(*self.events.get_nowait())

    def _on_event(self, client: ClientProcess, event: dict) -> None:
        kind = event.get("event")
        if kind == "ready":
            client.ready = True
        elif kind == "start":
            client.open.add(event["sid"])
            self.tally.counts["run"] += 1
        elif kind == "end":
            client.open.discard(event["sid"])
            self.on_end(event)

    def kill_one(self, rng: random.Random) -> bool:
        """SIGKILL a serving client with its p2p daemon and start another in its place; False if none serves."""
        candidates = [c for c in self.clients if c.ready and c.running()]
        if not candidates:
            return False
        client = rng.choice(candidates)
        client.child.kill()
        self.tally.counts["kills"] += 1
        self._retire(client, "dropped_with_client")
        self.start(client.sessions)
        return True

    def replace_crashed(self) -> bool:
        """A client that exited by itself lost its sessions and is replaced; False once MAX_CRASHES did."""
        for client in [c for c in self.clients if not c.running()]:
            tail = client.child.tail(20)
            self.tally.failures.append(f"client {client.name} exited with code {client.child.process.returncode}:\n{tail}")
            self.tally.counts["clients_crashed"] += 1
            client.child.stop()  # whatever it left in its group
            self._retire(client, "lost")
            if self.tally.counts["clients_crashed"] >= MAX_CRASHES:
                return False
            self.start(client.sessions)
        return True

    def stop(self, graceful: bool) -> None:
        """SIGTERM every client (SIGKILL to its group when not graceful); one still running STOP_TIMEOUT s
        later hung. What a client leaves in its process group is counted, then killed."""
        for client in self.clients:
            if not graceful:
                client.child.kill()
            elif client.running():  # the client alone: it stops its own p2p daemon once its sessions are closed
                client.child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for client in list(self.clients):
            try:
                client.child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.tally.failures.append(f"client {client.name} did not stop in {STOP_TIMEOUT:.0f} s after SIGTERM")
                self.tally.counts["clients_hung"] += 1
                client.child.kill()
            if graceful:
                time.sleep(0.2)  # a daemon stopped by its client may take a moment to exit
                left = live_in_groups([client.pid])
                if left:
                    self.tally.failures.append(f"client {client.name} left processes running: {left}")
                    self.tally.counts["processes_left_by_clients"] += len(left)
            client.child.stop()  # by its process group: anything the client left goes too
            self._retire(client, "lost")

    def _retire(self, client: ClientProcess, open_sessions_count_as: str) -> None:
        """Handle the rest of a stopped client's events; its sessions that never ended count as given."""
        client.child.reader.join(5)
        self.handle_events(timeout=0)
        self.clients.remove(client)
        self.tally.counts[open_sessions_count_as] += len(client.open)
        if open_sessions_count_as == "lost" and client.open:
            self.tally.example(f"{len(client.open)} sessions of client {client.name} never ended")
        client.open.clear()
