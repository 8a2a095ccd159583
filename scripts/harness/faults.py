"""FaultInjector: SIGKILLs servers of a LocalSwarm at random and restarts them, keeping every block served.

Policy: a server is killed only if the servers that are up without it (started and past SERVER
READY) still cover every block, so at every moment each block has at least one live server. A
killed server announces nothing: its DHT record still says ONLINE until it expires, so clients
meet it, fail, and must route around it. After a random down time it is restarted on the same
span as a new process: with a new identity (a fresh peer id, as a replacement machine would be),
or with same_identity, with the killed one's (a volunteer's machine coming back with its
--identity_path: clients may still have that peer id banned, and its old record is overwritten).
The DHT bootstrap peer is never killed. Kills are bounded by max_kills and everything stops with
stop(); a restart that does not reach SERVER READY in restart_timeout is killed and counted as failed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from petals_like.data_structures import parse_block_range
from petals_like.testing.local_swarm import LocalSwarm
from petals_like.testing.processes import Child

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One server position of the swarm: its span, and the process serving it now (if any)."""

    span: str
    blocks: range
    identity: str  # LocalSwarm's name of the identity it runs with
    child: Optional[Child] = None
    ready: bool = False  # past SERVER READY and not killed since
    down_until: Optional[float] = None  # when a killed server comes back; None while it runs or starts


class FaultInjector:
    def __init__(
        self,
        swarm: LocalSwarm,
        num_blocks: int,
        *,
        seed: int,
        max_kills: int,
        kill_interval: tuple[float, float],
        down_time: tuple[float, float],
        restart_timeout: float = 120.0,
        same_identity: bool = False,
        on_started: Callable[[Child], None] = lambda child: None,
    ):
        """The swarm's servers must be up (its `with` block entered). kill_interval and down_time are
        (low, high) seconds, drawn uniformly. on_started(child) is called once a restarted server is ready."""
        self.swarm = swarm
        self.num_blocks = num_blocks
        self.rng = random.Random(seed)
        self.max_kills = max_kills
        self.kill_interval = kill_interval
        self.down_time = down_time
        self.restart_timeout = restart_timeout
        self.same_identity = same_identity
        self.on_started = on_started
        self.slots = [
            _Slot(span, range(*parse_block_range(span, num_blocks)), swarm.identities[child], child, True)
            for span, child in zip(swarm.spans, swarm.servers)
        ]
        self.kills = 0
        self.restarts = 0  # restarted servers that reached SERVER READY
        self.failed_restarts: list[str] = []
        self._lock = threading.Lock()  # guards the slots and counters: restarts finish on their own threads
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault injector", daemon=True)
        self._starting: list[threading.Thread] = []

    def start(self) -> FaultInjector:
        self._thread.start()
        return self

    def stop(self) -> None:
        """No more faults; servers still starting are killed (not counted as failed). Returns when all is quiet."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            starting = [slot.child for slot in self.slots if slot.child is not None and not slot.ready]
        for child in starting:
            self.swarm.kill(child)  # ends its wait_ready at once
        for thread in self._starting:
            thread.join()

    def covered_without(self, victim: Optional[_Slot]) -> bool:
        """Whether the ready servers other than `victim` serve every block."""
        blocks = set()
        for slot in self.slots:
            if slot.ready and slot is not victim:
                blocks.update(slot.blocks)
        return len(blocks) == self.num_blocks

    # ---- the injector's thread ----

    def _run(self) -> None:
        next_kill = time.monotonic() + self.rng.uniform(*self.kill_interval)
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for slot in self.slots:
                if slot.down_until is not None and slot.down_until <= now:
                    self._restart(slot)
            if now >= next_kill and self.kills < self.max_kills:
                self._kill_one()
                next_kill = now + self.rng.uniform(*self.kill_interval)

    def _kill_one(self) -> None:
        with self._lock:
            victims = [slot for slot in self.slots if slot.ready and self.covered_without(slot)]
            if not victims:
                return  # every block would lose its last server: wait for the next turn
            slot = self.rng.choice(victims)
            child, slot.child, slot.ready = slot.child, None, False
            slot.down_until = time.monotonic() + self.rng.uniform(*self.down_time)
            self.kills += 1
        logger.info(f"Killing {child.name} (pid {child.pid}); back in {slot.down_until - time.monotonic():.1f} s")
        self.swarm.kill(child)

    def _restart(self, slot: _Slot) -> None:
        slot.down_until = None
        child = self.swarm.start_server(slot.span, slot.identity if self.same_identity else None)
        with self._lock:
            slot.child, slot.identity = child, self.swarm.identities[child]
        thread = threading.Thread(target=self._wait_ready, args=(slot, child), name=f"restart {slot.span}", daemon=True)
        self._starting.append(thread)
        thread.start()

    def _wait_ready(self, slot: _Slot, child: Child) -> None:
        try:
            self.swarm.wait_ready(child, self.restart_timeout)
        except Exception as e:
            if not self._stop.is_set():  # else it was stopped on purpose, at the end of the run
                logger.error(f"A restarted server did not come up: {e}")
                self.failed_restarts.append(f"{child.name}: {str(e).splitlines()[0]}")
            self.swarm.kill(child)
            with self._lock:
                slot.child = None
            return
        self.on_started(child)
        with self._lock:
            slot.ready = True
            self.restarts += 1

    @staticmethod
    def default_spans(num_blocks: int, servers: int) -> Sequence[str]:
        """`servers` spans that serve every block at least twice: the whole model, then its halves in turn
        (two servers: the whole model twice)."""
        if servers < 2:
            raise ValueError(f"killing servers while keeping every block served needs >= 2 servers, got {servers}")
        half = num_blocks // 2
        if servers == 2 or half == 0:
            return [f"0:{num_blocks}"] * servers
        halves = [f"0:{half}", f"{half}:{num_blocks}"]
        return [f"0:{num_blocks}"] + [halves[i % 2] for i in range(servers - 1)]
