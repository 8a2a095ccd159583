"""ComputeRuntime: the one thread that runs a server's block math, in priority order.

All compute goes through one thread so that requests never fight over the cores and the event
loop stays free for networking. Inference steps (someone is waiting for each token) go before
forward/backward work. The continuous-batching scheduler replaces the queue discipline later,
behind the same submit() contract.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from enum import IntEnum
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)


class Priority(IntEnum):
    INFERENCE = 0
    FORWARD = 1
    BACKWARD = 2


class ComputeRuntime:
    def __init__(self, num_threads: Optional[int] = None, name: str = "compute"):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._counter = itertools.count()  # FIFO among equal priorities; also keeps tuples comparable
        self._num_threads = num_threads
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        while True:
            _, _, task = self._queue.get()
            if task is None:
                return
            fn, args, loop, future = task
            if future.cancelled():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # delivered to the awaiting handler, which answers the client
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

    async def submit(self, priority: Priority, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the compute thread; awaits its result (or raises its exception)."""
        if not self._thread.is_alive():
            raise RuntimeError("the compute runtime is stopped")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((int(priority), next(self._counter), (fn, args, loop, future)))
        return await future

    def shutdown(self) -> None:
        self._queue.put((-1, -1, None))
        self._thread.join(timeout=30)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
