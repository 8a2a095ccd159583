"""InferenceSession: a chain of open inference streams whose servers hold this session's KV cache.

The client keeps, for every span of the chain, the hidden states it has sent there (its input
history). When a server fails, only its span is replaced: a new route for the same blocks is
opened and the history is replayed through it to rebuild the KV cache, then the step goes on.
The outputs do not change, because the replacement computes the same blocks on the same inputs.

With push (ClientConfig.use_push), a step goes to the first server only, together with the rest
of the chain; each server sends its output straight to the next one (see server/handler.py) and
the client just reads every server's answer, which it still needs as the next span's input
history. Where a server could not push ({"pushed": false}) or after a failure, the client relays
the output itself for the rest of that step. Steps carry their position, and answers to older
positions (a step that reached a server twice) are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, ContextManager, Optional

import torch

from petals_like.client.chain import ChainBuilder, Link, close_all
from petals_like.client.mux import StepMuxes
from petals_like.client.prefix import PrefixTracker
from petals_like.client.spot_check import SpotChecker, SpotCheckFailed
from petals_like.client.transport import RequestRefused, call_forward, callers_fault
from petals_like.client.tuning import RequestTuning
from petals_like.config import ClientConfig
from petals_like.data_structures import RemoteSpanInfo
from petals_like.dht.node import SwarmNode
from petals_like.protocol import PREFIX_PAGE_TOKENS
from petals_like.routing.manager import RouteManager
from petals_like.routing.planner import NoRouteError
from petals_like.wire import PushHop, Step, StepReply

logger = logging.getLogger(__name__)


class InferenceSession:
    """See the module docstring. With prefix_salt and token ids, servers may reuse cached prefix pages:
    the client sends chained page hashes (protocol.prefix_page_hashes), asks each server of the chain
    how much of the prompt it holds, and skips the minimum. The salt must cover everything besides
    the tokens that the keys depend on (model, adapters, client-side prompts)."""

    def __init__(
        self,
        node: SwarmNode,
        routes: RouteManager,
        config: ClientConfig,
        *,
        max_length: int,
        num_blocks: int,
        start: int = 0,
        prefix_salt: Optional[str] = None,
        tuning: Optional[RequestTuning] = None,
        spot_checker: Optional[SpotChecker] = None,
        muxes: Optional[StepMuxes] = None,
    ):
        """Blocks [start, num_blocks) (a sub-range: RemoteSequential slices). tuning: deep prompts, a
        client-held LoRA or a hosted adapter, given to every server at open. spot_checker: re-runs a
        random fraction of steps elsewhere (client/spot_check.py). muxes: the client's mux streams, which
        carry the steps of all its sessions on a server in one message (client/mux.py)."""
        self.node = node
        self.tuning = tuning or RequestTuning(adapter=config.active_adapter)
        self.routes = routes
        self.config = config
        self.spot_checker = spot_checker or SpotChecker(routes, config)
        self.max_length = max_length
        self.num_blocks = num_blocks
        self.start = start
        self._position = 0  # tokens processed by every span so far
        self._rewind = False  # the next step first rolls every server back to `position` (see position's setter)
        self.last_token_ids: Optional[torch.Tensor] = None  # sampled but not yet sent (used by generate)
        self.finished: Optional[torch.Tensor] = None  # [batch] bool: sequences that produced EOS (used by generate)
        self.token_ids: Optional[torch.Tensor] = None  # [batch, position]: the tokens behind the steps, if generate() ran them
        self._chain: list[Link] = []
        self.closed = False
        self.num_failovers = 0
        self.prefix = PrefixTracker(prefix_salt)  # names of the full pages, for prefix reuse
        self.builder = ChainBuilder(node, routes, config, self.tuning, max_length, muxes)  # opens links (client/chain.py)
        self.reused_tokens = 0  # prompt positions taken from servers' prefix caches instead of computed
        # every block-0 input while a reused prefix is in the chain (a failure then replays them all);
        # without reuse, each link's own history is enough and this stays empty
        self._inputs: list[torch.Tensor] = []
        # the last step's trip: (server, its answer, seconds from the step's start to that answer) per
        # link in order (bench (t)'s per-token timeline)
        self.last_trip: list[tuple[str, StepReply, float]] = []
        # entered and left with the session's `with` block (the model that made it sets it: use_session)
        self.context: Optional[Callable[[], ContextManager[Any]]] = None
        self._entered: Optional[ContextManager[Any]] = None

    @property
    def position(self) -> int:
        """Tokens the session holds: those of every step so far."""
        return self._position

    @position.setter
    def position(self, value: int) -> None:
        """Roll the session back to its first `value` tokens (Petals' way: `session.position = k`).

        The next step continues from there: every server of the chain first drops the tokens past
        `value` (their KV pages go back to the pool), and the inputs kept for fail-over are cut
        alike, so a replacement server rebuilds exactly the rolled-back state. generate() then needs
        input_ids again (the token it would have continued with came after `value`)."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"position must be an int, got {type(value).__name__}")
        if not 0 <= value <= self._position:
            raise ValueError(f"a session can only be rolled back: position must be in [0, {self._position}], got {value}")
        if self.closed:
            raise RuntimeError("this inference session is closed")
        if value == self._position:
            return
        self._position, self._rewind = value, True
        self.last_token_ids = self.finished = None
        if self.token_ids is not None:
            self.token_ids = self.token_ids[:, :value]
        self.prefix.truncate(value)
        kept = value - self.reused_tokens  # link histories start after the positions taken from a prefix cache
        for link in self._chain:
            link.history = _first_tokens(link.history, max(kept, 0))
        self._inputs = _first_tokens(self._inputs, value)

    @property
    def batch_size(self) -> Optional[int]:
        """Rows of every step, fixed by the first one (None before it); the builder opens links with it."""
        return self.builder.batch_size

    @property
    def pad_lens(self) -> Optional[list[int]]:
        """Left padding of each row, given with the first step."""
        return self.builder.pad_lens

    # ---- public, synchronous ----

    def step(
        self,
        hidden: torch.Tensor,
        *,
        pad_lens: Optional[list[int]] = None,
        token_ids: Optional[torch.Tensor] = None,
        hypo_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run new tokens' hidden states [batch, seq, hidden] through every block; returns the same shape.

        token_ids [batch, seq] (the tokens behind `hidden`) enable prefix reuse for batch-1 sessions;
        positions taken from a server's prefix cache (the first `reused_tokens` of the first step)
        come back as zeros, since no server computed them.

        hypo_ids [batch] (Petals' name; beam search): before this step, row i continues what row
        hypo_ids[i] holds, on every server (and in what the client keeps for fail-over).
        """
        return self.node.run(self.astep(hidden, pad_lens=pad_lens, token_ids=token_ids, hypo_ids=hypo_ids))

    async def astep(
        self,
        hidden: torch.Tensor,
        *,
        pad_lens: Optional[list[int]] = None,
        token_ids: Optional[torch.Tensor] = None,
        hypo_ids: Optional[torch.Tensor] = None,
        when_open: Optional[Callable[[], Awaitable[None]]] = None,
    ) -> torch.Tensor:
        """step() as a coroutine on the node's loop (many sessions of one process then share its thread).

        when_open: awaited after this step opened the session's first chain, before the step leaves;
        generate() lets sessions that start together send their prompts together with it
        (client/head_batcher.py)."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        if hidden.ndim != 3:
            raise ValueError(f"hidden states must be [batch, seq, hidden], got {tuple(hidden.shape)}")
        if self.batch_size is None:
            self.builder.batch_size, self.builder.pad_lens = hidden.shape[0], pad_lens
        elif hidden.shape[0] != self.batch_size:
            raise ValueError(f"batch size {hidden.shape[0]} differs from the session's {self.batch_size}")
        elif pad_lens is not None and any(pad_lens) and not (self._position == 0 and list(pad_lens) == self.pad_lens):
            raise ValueError("pad_lens apply to the first step of a session only (they stay after a rollback to 0)")
        if self._position + hidden.shape[1] > self.max_length:
            raise ValueError(f"{self._position} + {hidden.shape[1]} tokens exceed the session's max_length={self.max_length}")
        hypo = self._reorder(hypo_ids, hidden.shape[0])
        if hidden.shape[1] == 0:  # no tokens, no outputs: nothing to ask any server
            return hidden.detach().cpu()
        self.prefix.track(token_ids, hidden, self.pad_lens)
        timeout = self.config.request_timeout * (1 + self.config.max_retries)
        try:
            async with asyncio.timeout(timeout):
                out = await self._step(hidden.detach().cpu(), when_open, hypo)
        except asyncio.TimeoutError:
            raise TimeoutError(f"an inference step did not finish in {timeout} s") from None
        self._position += hidden.shape[1]
        self._rewind = False
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:  # close_all swallows each stream's errors; what is left is the node (stopped, or too slow)
            self.node.run(close_all(self._chain), timeout=10)
        except (TimeoutError, RuntimeError) as e:
            logger.debug(f"Closing an inference session: {e!r}")

    def abort(self) -> None:
        """Drop every connection at once, with no close message: what servers see when a client vanishes
        (they free the session's pages on their own). For tests of that path; close() is the polite way."""
        self.closed = True
        for link in self._chain:
            link.stream.abort()

    def __enter__(self) -> InferenceSession:
        if self.context is not None:  # e.g. the model's use_session(self)
            self._entered = self.context()
            self._entered.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            entered, self._entered = self._entered, None
            if entered is not None:
                entered.__exit__(*exc)

    # ---- internals, on the node's loop ----

    def _reorder(self, hypo_ids: Optional[torch.Tensor], batch: int) -> tuple[int, ...]:
        """Apply a row order to what the client keeps (histories, token ids) and return it for the
        servers; () when there is none or it changes nothing."""
        if hypo_ids is None:
            return ()
        hypo = torch.as_tensor(hypo_ids).reshape(-1)
        if hypo.dtype.is_floating_point or hypo.dtype == torch.bool or hypo.numel() != batch:
            raise ValueError(f"hypo_ids must be {batch} integer row indices, got {tuple(hypo.shape)} {hypo.dtype}")
        if hypo.numel() and not bool(((hypo >= 0) & (hypo < batch)).all()):
            raise ValueError(f"hypo_ids must be in [0, {batch}), got {hypo.tolist()}")
        if self._position == 0 or torch.equal(hypo, torch.arange(batch)):
            return ()
        hypo = hypo.long()
        for link in self._chain:
            link.history = [h[hypo] for h in link.history]
        self._inputs = [h[hypo] for h in self._inputs]
        if self.token_ids is not None:
            self.token_ids = self.token_ids[hypo]
        return tuple(hypo.tolist())

    def _page_hashes(self) -> list[str]:
        """What every new link gets at open: the page hashes so far, while they are tracked."""
        return self.prefix.hashes if self.prefix.active else []

    async def _step(
        self, hidden: torch.Tensor, when_open: Optional[Callable[[], Awaitable[None]]] = None, hypo: tuple[int, ...] = ()
    ) -> torch.Tensor:
        full_input = hidden
        reuse = 0
        if not self._chain:
            reuse = await self._open_chain(hidden, when_open)
            hidden = hidden[:, reuse:]
            new_hashes, sent_hashes = self.prefix.unsent(len(self.prefix.hashes))  # the open message had them all
        else:
            new_hashes, sent_hashes = self.prefix.unsent(self.prefix.sent)
        position, rewind = self.position, self._rewind

        def step_for(link: Link, push_to: list[Link] = ()) -> Step:
            chain = tuple(PushHop(nxt.span.peer_id, nxt.push_token, step_for(nxt)) for nxt in push_to)
            as_is = link.fresh  # rebuilt during this step: it already holds the rolled-back, reordered rows
            return Step(
                link.session_id,
                position,
                reuse,
                tuple(new_hashes),
                sent_hashes,
                push_chain=chain,
                rewind=rewind and not as_is,
                hypo_ids=() if as_is else hypo,
            )

        for link in self._chain:
            link.fresh = False
        hidden = await self._through_chain(hidden, full_input, step_for)
        if self.reused_tokens:
            self._inputs.append(full_input)
        self.prefix.sent = len(self.prefix.hashes)
        if hidden.shape[1] < full_input.shape[1]:  # reused prefix positions were not computed: zeros
            skipped = full_input.shape[1] - hidden.shape[1]
            hidden = torch.cat([hidden.new_zeros(hidden.shape[0], skipped, hidden.shape[2]), hidden], dim=1)
        return hidden

    async def _open_chain(self, hidden: torch.Tensor, when_open: Optional[Callable[[], Awaitable[None]]]) -> int:
        """Open the session's first chain (asking for a new route while servers of the old one vanish);
        returns how many leading positions of `hidden` the first server has in its prefix cache."""
        probe = self.position == 0 and bool(self.prefix.hashes)
        for attempt in range(self.config.max_retries + 1):
            try:
                self._chain, cached = await self.builder.open(self.start, self.num_blocks, self._page_hashes(), probe=probe)
                break
            except (NoRouteError, RequestRefused):
                raise
            except Exception as e:  # a server of the route went away: ask for another route
                if attempt == self.config.max_retries:
                    raise RuntimeError(f"could not open an inference chain: {e!r}") from e
                await self.routes.refresh(force=True)  # the swarm changed: read it again
        if when_open is not None and self.position == 0:
            await when_open()
        # keep at least the last prompt token: its output is what the client needs
        self.reused_tokens = min(cached, (hidden.shape[1] - 1) // PREFIX_PAGE_TOKENS * PREFIX_PAGE_TOKENS)
        return self.reused_tokens

    async def _through_chain(self, hidden: torch.Tensor, full_input: torch.Tensor, step_for: Callable[..., Step]) -> torch.Tensor:
        """Walk the step through the chain, link by link (each server may push its output on to the
        next); a failed link is banned and replaced, and the step goes on from there."""
        index = 0
        attempts = 0
        started = time.perf_counter()
        self.last_trip = []
        relay = not self.config.use_push  # after a failure the client relays for the rest of the step
        delivered = False  # the previous server pushed this link's input to it
        position = self.position
        while index < len(self._chain):
            link = self._chain[index]
            try:
                if not delivered:
                    step = step_for(link, [] if relay else self._chain[index + 1 :])
                    await link.stream.send_step(hidden, step)
                reply, message = await link.stream.read_step(position, timeout=self.config.request_timeout)
                out = link.stream.output(message, hidden)
                if not self.reused_tokens and self.spot_checker.draw():
                    await self._spot_check(link, hidden, out)
            except (Exception, asyncio.CancelledError) as e:
                if isinstance(e, asyncio.CancelledError) and asyncio.current_task().cancelling():
                    raise
                if refused := callers_fault(e, link.span):
                    raise refused from e
                attempts += 1
                if attempts > self.config.max_retries:
                    raise RuntimeError(f"inference step failed {attempts} times; last error: {e!r}") from e
                self.routes.ban(link.span.peer_id, repr(e))
                relay, delivered = True, False
                if isinstance(e, SpotCheckFailed):
                    # the servers after it may already hold its wrong output (pushed): rebuild them too,
                    # from the inputs the client kept for them
                    for later in range(len(self._chain) - 1, index, -1):
                        await self._replace(later)
                if self.reused_tokens:
                    # links after the first never saw the reused prefix's hidden states: rebuild all
                    return await self._rebuild_all(full_input)
                await self._replace(index)
                continue
            self.routes.succeeded(link.span.peer_id)
            self.last_trip.append((link.span.peer_id, reply, time.perf_counter() - started))
            delivered = not relay and reply.pushed is True
            link.history.append(hidden)
            hidden = out
            index += 1
        return hidden

    async def _spot_check(self, link: Link, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """Compare a step's output with another server's forward over the link's whole input history."""
        inputs = torch.cat(link.history + [hidden], dim=1)
        steps = hidden.shape[1]

        async def run_on(other: RemoteSpanInfo) -> torch.Tensor:
            extras = self.tuning.extras(other, with_weights=True)
            full = await call_forward(
                self.node.p2p, other, inputs, self.pad_lens, timeout=self.config.request_timeout, extras=extras
            )
            return full[:, -steps:]

        await self.spot_checker.verify(link.span, out, run_on, wire=self.config.wire)

    async def _rebuild_all(self, current: torch.Tensor) -> torch.Tensor:
        """Replace the whole chain and replay every input so far plus this step, computing everything."""
        await close_all(self._chain)
        self._chain = []
        replay = torch.cat(self._inputs + [current], dim=1)
        for _ in range(self.config.max_retries):
            chain: list[Link] = []
            try:
                await self.routes.refresh(force=True)
                chain, _ = await self.builder.open(self.start, self.num_blocks, self._page_hashes())
                out = replay
                for link in chain:
                    out = await link.replay(out, timeout=self.config.request_timeout)
            except Exception as e:
                logger.warning(f"Rebuilding the chain failed: {e!r}")
                await close_all(chain)
                continue
            self._chain = chain
            self.reused_tokens = 0  # every link now holds the whole history: per-link replay suffices
            self._inputs = []
            self.num_failovers += 1
            return out[:, -current.shape[1] :]
        raise RuntimeError("could not rebuild the inference chain")

    async def _replace(self, index: int) -> None:
        """Swap the span at `index` for a new chain over the same blocks, rebuilding its KV cache."""
        failed = self._chain[index]
        await close_all([failed])
        last_error: Optional[BaseException] = None
        for _ in range(self.config.max_retries):
            replacement: list[Link] = []
            link: Optional[Link] = None
            try:
                await self.routes.refresh(force=True)
                replacement, _ = await self.builder.open(failed.span.start, failed.span.end, self._page_hashes())
                replayed = torch.cat(failed.history, dim=1) if failed.history else None
                for link in replacement:
                    if replayed is None:
                        break
                    replayed = await link.replay(replayed, timeout=self.config.request_timeout)
            except Exception as e:
                last_error = e
                logger.warning(f"Replacing span {failed.span.start}:{failed.span.end} failed: {e!r}")
                if link is not None:
                    self.routes.ban(link.span.peer_id, repr(e))
                await close_all(replacement)
                continue
            self.num_failovers += 1
            self._chain[index : index + 1] = replacement
            return
        raise RuntimeError(f"could not replace span {failed.span.start}:{failed.span.end}: {last_error!r}")


def _first_tokens(tensors: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first n positions of the steps `tensors` ([batch, seq_i, hidden] each), as a list of steps."""
    kept: list[torch.Tensor] = []
    for tensor in tensors:
        if n <= 0:
            break
        kept.append(tensor[:, :n])
        n -= tensor.shape[1]
    return kept
