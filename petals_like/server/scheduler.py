"""Scheduler: continuous batching of every session's inference steps, then forward/backward work.

One thread runs the loop. Each iteration takes the pending inference steps, decode-sized ones
first, and fills a token budget: a step with more tokens than what is left of the budget runs
only a chunk now and the rest in later iterations (chunked prefill), so a long prompt never
stalls other sessions' decoding. The chosen tokens of all sessions run through the span together
(run_batched: linear layers over all tokens, attention per sequence over its pages). Forward and
backward calls run only when no inference step is waiting.

No networking and no page bookkeeping here: the handler reserves pages on the event loop before it
submits a step and frees them after, so the pool is only ever mutated from one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from petals_like.models.lora import BlockLora
from petals_like.server.batched_span import SessionSlice, run_slices
from petals_like.server.kv_cache import KVPool, SequencePages
from petals_like.server.runtime import Priority
from petals_like.utils.threads import use_threads

logger = logging.getLogger(__name__)

MAX_DECODE_WAIT = 0.25  # seconds a prompt chunk is held back at most for decoding sessions (DecodePace)
_EMA = 0.3  # weight of the newest sample in the decode-pace averages


class DecodePace:
    """When decoding sessions come back after an iteration, and how long a prompt chunk waits for them.

    With only prompt chunks pending while decoding sessions are at other servers or at their
    clients, a prompt-only iteration is free time if it ends before they are back. If it would
    not (it still runs when their steps arrive, and on a machine shared with the next server it
    also slows that server's decode iteration), the chunk waits and rides along in their
    iteration instead, bounded: at most a quarter of the gap past their expected return, and at
    most max_wait. Times are passed in (time.monotonic() in the scheduler, made-up ones in tests).
    """

    def __init__(self, max_wait: float = MAX_DECODE_WAIT, ema: float = _EMA):
        self.max_wait, self.ema = max_wait, ema
        self.decode_done: Optional[float] = None  # end of the last iteration with decode steps
        self.decode_gap: Optional[float] = None  # smoothed time from there to the next decode step's arrival
        self.prompt_only: Optional[float] = None  # smoothed duration of iterations with prompt chunks only

    def _smooth(self, old: Optional[float], new: float) -> float:
        return new if old is None else (1 - self.ema) * old + self.ema * new

    def observe(self, decode_arrivals: Sequence[float], prompt_only: bool, started: float, ended: float) -> None:
        """One iteration ran: the arrival times of the fresh decode steps in it, and whether it ran
        prompt chunks only."""
        if decode_arrivals:
            if self.decode_done is not None and min(decode_arrivals) > self.decode_done:
                self.decode_gap = self._smooth(self.decode_gap, min(decode_arrivals) - self.decode_done)
            self.decode_done = ended
        elif prompt_only:
            self.prompt_only = self._smooth(self.prompt_only, ended - started)

    def hold_until(self, now: float) -> float:
        """Until when pending prompt chunks (and no decode step) should wait; 0.0 for not at all."""
        gap, done, duration = self.decode_gap, self.decode_done, self.prompt_only
        if gap is None or done is None or duration is None:
            return 0.0
        due = done + gap
        if now + duration <= due or now > due + gap:  # the chunk fits, or they are not coming back soon
            return 0.0
        return min(due + 0.25 * gap, now + self.max_wait)


@dataclass(eq=False)  # identity, not field equality: works are found in queues by `is`
class InferenceWork:
    """One inference step of one session: its new tokens, maybe processed over several iterations."""

    hidden: torch.Tensor  # [batch, seq, hidden] in the compute dtype
    sequences: Sequence[SequencePages]  # one per row of the batch, pages already reserved for seq more tokens
    pad_lens: Sequence[int]  # left padding of each row
    first: int  # blocks [first, last) of the span
    last: int
    lora: Optional[Sequence[BlockLora]] = None  # the session's adapter, one per block of [first, last)
    prompts: Optional[torch.Tensor] = None  # deep prompts [last - first, prefix, hidden] for positions < prefix
    loop: asyncio.AbstractEventLoop = field(repr=False, default=None)
    future: asyncio.Future = field(repr=False, default=None)
    done_tokens: int = 0  # positions of `hidden` already run (same for every row)
    submitted: float = 0.0  # time.monotonic() when it reached the scheduler
    iterations_s: float = 0.0  # seconds of the iterations that ran its tokens (with other sessions' tokens)
    outputs: list[torch.Tensor] = field(default_factory=list)  # [batch, chunk, hidden] each
    cancelled: bool = False  # the session went away: finish nothing, deliver nothing
    _finished: bool = False
    _after: Optional[Callable[[], None]] = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def remaining(self) -> int:
        return self.hidden.shape[1] - self.done_tokens

    def after_done(self, callback: Callable[[], None]) -> None:
        """Run callback on the event loop once the scheduler no longer touches this work's pages.

        A session that disconnects mid-step frees its pages through this, never while an iteration
        may still write into them (they could already belong to someone else).
        """
        with self._lock:
            if not self._finished:
                self._after = callback
                return
        callback()

    def _mark_done(self) -> None:
        with self._lock:
            self._finished, callback = True, self._after
        if callback is not None:
            self.loop.call_soon_threadsafe(callback)


@dataclass
class SchedulerStats:
    iterations: int = 0  # batched passes over the span
    inference_tokens: int = 0
    max_batch_tokens: int = 0  # most tokens in one iteration
    chunked_steps: int = 0  # steps that needed more than one iteration
    tasks: int = 0  # forward/backward calls
    busy_seconds: float = 0.0  # time spent computing (iterations and tasks)


class Scheduler:
    def __init__(
        self,
        span,
        pool: KVPool,
        *,
        token_budget: int,
        num_threads: Optional[int] = None,
        gather_wait: float = 0.02,
        prefill_chunk: int = 16,
    ):
        if token_budget < 1:
            raise ValueError(f"token_budget={token_budget} must be positive")
        self.span = span
        self.pool = pool
        self.token_budget = token_budget
        self.stats = SchedulerStats()
        # while decode steps wait (or other sessions are active), a prompt advances by at most this
        # many tokens per iteration: an iteration's time grows with its tokens, and every decoding
        # session waits for all of it
        self.prefill_chunk = prefill_chunk
        # sessions that were in the last iteration come back together after their clients' round
        # trips; waiting a moment for them keeps them in one batch instead of two alternating ones
        self.gather_wait = gather_wait
        self._last_batch = 0
        self._last_duration = 0.0  # seconds of the last iteration
        self.pace = DecodePace()  # when decoding sessions come back (holds prompt-only chunks for them)
        # how many sessions are likely to send a step soon (set by the session manager); the gather
        # wait waits for them, not only for the last batch's size, so split batches merge again
        self.expected_works: Optional[Callable[[], int]] = None
        self._num_threads = num_threads
        self._pending: deque[InferenceWork] = deque()
        self._tasks: list = []  # heap of (priority, seq, fn, args, loop, future)
        self._counter = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        self._held = False  # hold(): no iteration starts
        self.on_iteration: Optional[Callable[[list[InferenceWork]], None]] = None  # test hook: the works of each iteration
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    # ---- submission (event loop) ----

    async def run_inference(self, work: InferenceWork) -> torch.Tensor:
        """Queue one step; returns its output [batch, seq, hidden] once all its tokens have run."""
        self._check_alive()
        work.loop = asyncio.get_running_loop()
        work.future = work.loop.create_future()
        work.submitted = time.monotonic()
        with self._wake:
            self._pending.append(work)
            self._wake.notify()
        try:
            return await work.future
        except asyncio.CancelledError:
            work.cancelled = True  # the loop skips it; pages stay reserved until the handler frees them
            raise

    async def submit(self, priority: Priority, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) (a forward or backward call) once no inference step waits; returns its result."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._wake:
            heapq.heappush(self._tasks, (int(priority), next(self._counter), fn, args, loop, future))
            self._wake.notify()
        return await future

    @property
    def num_pending(self) -> int:
        """Inference steps queued or part-way through (a step leaves once all its tokens ran)."""
        return len(self._pending)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """No iteration starts inside this block (one already running finishes); steps queue up.

        Lets a caller line steps up so that the next iteration plans them together, whatever the
        timing of their arrival: tests of batching use it instead of counting on a gather window."""
        with self._wake:
            self._held = True
        try:
            yield
        finally:
            with self._wake:
                self._held = False
                self._wake.notify()

    def _check_alive(self) -> None:
        if self._stopped or not self._thread.is_alive():
            raise RuntimeError("the scheduler is stopped")

    # ---- the loop (scheduler thread) ----

    def _run(self) -> None:
        use_threads(self._num_threads)  # the one thread of a server that computes on several cores (utils/threads.py)
        while True:
            with self._wake:
                while not self._stopped and (self._held or (not self._pending and not self._tasks)):
                    self._wake.wait()
                active = self._expected()  # read once per iteration: it walks the session table
                expected = max(self._last_batch, active)
                if self._pending and len(self._pending) < expected and self.gather_wait > 0:
                    # an iteration reads every weight once: waiting a fraction of one for the rest of
                    # the last batch is cheaper than running them in a second iteration
                    window = min(0.05, max(self.gather_wait, 0.5 * self._last_duration))
                    decoding = any(w.remaining == 1 for w in self._pending)
                    deadline = max(time.monotonic() + window, 0.0 if decoding else self.pace.hold_until(time.monotonic()))
                    while len(self._pending) < expected and not self._stopped:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._wake.wait(left)
                if self._stopped:
                    return
                if self._held:  # hold() began during the gather wait
                    continue
                works, dropped = _partition_cancelled(self._pending)
                self._pending = deque(works)
                task = heapq.heappop(self._tasks) if not works and self._tasks else None
            for work in dropped:
                work._mark_done()
            try:
                if works:
                    self._iterate(works, active)
                elif task is not None:
                    self._run_task(task)
            except BaseException as e:  # the loop must outlive any bug in one iteration
                logger.exception("Scheduler iteration failed")
                for work in works:
                    self._finish(work, error=e)

    def _expected(self) -> int:
        if self.expected_works is None:
            return 0
        try:
            return self.expected_works()
        except Exception:  # a racing read of the session table; the last batch size still applies
            return 0

    def _choose(self, works: list[InferenceWork], active: int = 0) -> list[tuple[InferenceWork, int]]:
        """Which works run this iteration and how many positions of each: decode-sized steps first.

        active: sessions likely to send a step soon (expected_works), pending or not."""
        chosen, budget = [], self.token_budget
        ordered = sorted(works, key=lambda w: w.remaining)  # stable: FIFO among equals
        decode_tokens = sum(w.hidden.shape[0] for w in ordered if w.remaining == 1)
        prompts = sum(1 for w in ordered if w.remaining > 1)
        if decode_tokens or active > prompts:
            # decoding sessions are waiting, or will be back within this iteration (at the other
            # servers of their chains, or at their clients): each prompt advances by a chunk, so
            # that no decode step ever waits behind a long iteration, while many short prompts
            # arriving together (sessions starting at once) still join in one iteration, not one each
            prompt_rows = sum(w.hidden.shape[0] for w in ordered if w.remaining > 1)
            budget = min(budget, decode_tokens + self.prefill_chunk * max(1, prompt_rows))
        for work in ordered:
            rows = work.hidden.shape[0]
            positions = min(work.remaining, budget // rows)
            if positions <= 0:
                if not chosen:  # a batch wider than the budget still runs, one position at a time
                    chosen.append((work, 1))
                break
            chosen.append((work, positions))
            budget -= positions * rows
        return chosen

    def _iterate(self, works: list[InferenceWork], active: int = 0) -> None:
        started = time.monotonic()
        chosen = self._choose(works, active)
        self._last_batch = len(chosen)
        if self.on_iteration is not None:
            self.on_iteration([w for w, _ in chosen])
        groups: dict[tuple[int, int], list[tuple[InferenceWork, int]]] = {}
        for work, positions in chosen:
            groups.setdefault((work.first, work.last), []).append((work, positions))
        failed: dict[int, BaseException] = {}
        tokens = 0
        for (first, last), members in groups.items():
            slices = [
                SessionSlice(w.hidden[:, w.done_tokens : w.done_tokens + n], w.sequences, w.pad_lens, w.lora, w.prompts)
                for w, n in members
            ]
            try:
                outputs = run_slices(self.span, self.pool, slices, first=first, last=last)
            except BaseException as e:  # one bad group must not take the others down
                logger.exception("Batched iteration failed")
                for work, _ in members:
                    failed[id(work)] = e
                continue
            for (work, positions), out in zip(members, outputs):
                work.outputs.append(out)
                for pages in work.sequences:
                    pages.length += positions  # commit only after every block ran
                tokens += out.shape[0] * positions
        ended = time.monotonic()
        self._last_duration = ended - started
        ran = [w for w, _ in chosen]
        for work in ran:
            work.iterations_s += self._last_duration
        arrivals = [w.submitted for w in ran if w.remaining == 1 and w.done_tokens == 0]
        self.pace.observe(arrivals, all(w.remaining > 1 for w in ran), started, ended)
        self.stats.busy_seconds += self._last_duration
        self.stats.iterations += 1
        self.stats.inference_tokens += tokens
        self.stats.max_batch_tokens = max(self.stats.max_batch_tokens, tokens)
        finished: list[tuple[InferenceWork, Any, Optional[BaseException]]] = []
        for work, positions in chosen:
            if id(work) in failed:
                finished.append((work, None, failed[id(work)]))
                continue
            work.done_tokens += positions
            if work.remaining == 0:
                if len(work.outputs) > 1:
                    self.stats.chunked_steps += 1
                finished.append((work, torch.cat(work.outputs, dim=1), None))
        self._finish_all(finished)

    def _finish(self, work: InferenceWork, *, result: Any = None, error: Optional[BaseException] = None) -> None:
        self._finish_all([(work, result, error)])

    def _finish_all(self, finished: Sequence[tuple[InferenceWork, Any, Optional[BaseException]]]) -> None:
        """Deliver results (or errors) to their event loops, one callback per loop.

        The steps of one iteration then resume in the same turn of their loop, so their pushes to
        the next server leave together (see server.push)."""
        if not finished:
            return
        with self._wake:
            for work, _, _ in finished:
                try:
                    self._pending.remove(work)
                except ValueError:
                    pass
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for work, result, error in finished:
            by_loop.setdefault(work.loop, []).append((work.future, result, error))
        for loop, outcomes in by_loop.items():
            loop.call_soon_threadsafe(_deliver, outcomes)
        for work, _, _ in finished:
            work._mark_done()

    def _run_task(self, task) -> None:
        _, _, fn, args, loop, future = task
        if future.cancelled():
            return
        self.stats.tasks += 1
        started = time.monotonic()
        try:
            result = fn(*args)
        except BaseException as e:
            loop.call_soon_threadsafe(_set_exception, future, e)
        else:
            loop.call_soon_threadsafe(_set_result, future, result)
        finally:
            self.stats.busy_seconds += time.monotonic() - started

    def shutdown(self) -> None:
        """Stop the loop; every step and task still waiting gets an error (its client may go elsewhere)."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)
        with self._wake:
            works, self._pending = list(self._pending), deque()
            tasks, self._tasks = self._tasks, []
        error = RuntimeError("the server stopped serving these blocks; retry elsewhere")
        for work in works:
            try:
                self._finish(work, error=error)
            except RuntimeError:  # its event loop is already closed: nobody waits for it
                pass
        for _, _, _, _, loop, future in tasks:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_set_exception, future, error)


def _partition_cancelled(pending: Iterable[InferenceWork]) -> tuple[list[InferenceWork], list[InferenceWork]]:
    """(works to run, cancelled works): each work's flag read once, since the event loop may set it
    at any moment. A work put in both lists would be run while its pages go back to the pool."""
    works, dropped = [], []
    for work in pending:
        (dropped if work.cancelled else works).append(work)
    return works, dropped


def _deliver(outcomes: list[tuple[asyncio.Future, Any, Optional[BaseException]]]) -> None:
    for future, result, error in outcomes:
        if error is not None:
            _set_exception(future, error)
        else:
            _set_result(future, result)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
