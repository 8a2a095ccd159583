"""Which threads of a server process run torch on several cores.

Why: every thread that starts OpenMP work keeps a team of its own, and once there are more team threads
than CPUs, libgomp stops spinning between parallel regions, which slows a decode iteration's hundreds of
short regions (measurements: docs/benchmarks.md, "Server threads").

So a server computes with several threads on one thread only, its scheduler's; heavy one-off work
(loading and quantizing blocks) runs on a short-lived thread whose team goes with it, and the
other long-lived threads of a run_server process (its main thread and the event loop) keep torch
on one core. torch.set_num_threads also sets the count that threads starting later inherit, so
the threads that compute set theirs explicitly; a Server started inside another program (tests)
leaves that program's threads as they are.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")

DEFAULT_THREADS = torch.get_num_threads()  # torch's own default, read before anything here changes it


def use_threads(num_threads: Optional[int] = None) -> None:
    """This thread computes: num_threads torch threads (None = torch's default)."""
    torch.set_num_threads(num_threads or DEFAULT_THREADS)


def serial_thread() -> None:
    """This thread only coordinates: its torch ops run on one core and start no thread team."""
    torch.set_num_threads(1)


def in_compute_thread(fn: Callable[..., T], *args, num_threads: Optional[int] = None) -> T:
    """fn(*args) on a new thread with num_threads torch threads; returns its result or raises its error.

    The thread, and the OpenMP team it started, end before this returns."""
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        use_threads(num_threads)
        try:
            result.append(fn(*args))
        except BaseException as e:  # handed to the caller
            error.append(e)

    thread = threading.Thread(target=run, name="compute", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def shared_cores_env() -> dict[str, str]:
    """The environment for a process of a local swarm (the demo's and the benchmark's servers, DHT
    and helper clients), which shares this machine's cores with the others: idle OpenMP threads
    sleep at once (OMP_WAIT_POLICY=PASSIVE) instead of spinning for a while after each parallel
    region on cores another process is computing on. A value the caller's environment sets is kept.

    Measured with the bench model on 2 cores: two training chains over four servers took 15.4 s a
    step with spinning servers and 6.6-7.6 s with passive ones; one session through two servers is
    the same within the noise (13-14 tok/s). A server alone on its machine is better off spinning
    (one 16-row iteration of 8 blocks: 31 vs 47 ms passive), so run_server itself leaves the policy
    to the environment."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env
