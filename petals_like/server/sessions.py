"""Inference sessions on a server: open, validate steps, reserve pages, reuse prefixes, close.

Everything here runs on the event loop, which is the only thread that touches page bookkeeping;
the scheduler thread only reads and writes the tensors of pages reserved here.

Prefix reuse: a client may send, with any step, the chained hashes of its full pages
(wire.Step.page_hashes, starting at page hash_start). The open message's hashes are looked up at
once and the server answers wire.OpenReply(cached_tokens); the client then sends its first step
without the first reuse_tokens positions (the minimum over its chain), and those positions come from the
shared pages. Pages are cached under a scope: the client's peer id by default, because a server
sees hidden states, not tokens, and cannot check a claimed hash; --share_prefix_cache drops the
peer id from the scope for operators who trust their clients. The pages found at the open are
held until the first step, so that pool pressure in between cannot evict them and hand them to
another session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from petals_like.config import ServerConfig
from petals_like.models.span import BlockRange
from petals_like.protocol import PREFIX_PAGE_TOKENS, ErrorCode, ProtocolError
from petals_like.server.backend import SpanBackend
from petals_like.server.kv_cache import CacheExhausted, KVPool, PrefixIndex, SequencePages, reserve_rows
from petals_like.server.scheduler import InferenceWork, Scheduler
from petals_like.wire import OpenSession, Step

logger = logging.getLogger(__name__)

KEEP_OUTPUT_TOKENS = 64  # a session keeps its last step's output only for steps up to this many tokens


@dataclass
class ServerSession:
    session_id: str
    peer_id: str
    blocks: BlockRange
    max_length: int
    batch_size: int
    pad_lens: list[int]
    sequences: list[SequencePages]
    scope: str  # prefix-cache namespace of this session's pages
    hashes: list[str] = field(default_factory=list)  # chained hashes of full pages, from the client
    cached_pages: list[int] = field(default_factory=list)  # prefix pages found at open, held and offered for reuse
    inserted_pages: int = 0  # full pages already published to the prefix index
    steps: int = 0
    inflight: Optional[InferenceWork] = None
    last_step_done: float = 0.0  # time.monotonic() when its last step returned
    opened: float = field(default_factory=time.monotonic)  # when its stream opened it
    push_pending: bool = False  # a pushed step was accepted and is on its way to the scheduler
    push_token: Optional[str] = None  # secret the client gave this session; a push must carry it
    inbox: Optional[asyncio.Queue] = None  # steps pushed by the previous server or sent on a mux, read by the session's stream
    mux: Optional[Any] = None  # the client's mux stream (server/mux.py) that carries this session's answers, if any
    last_output: Optional[tuple[int, torch.Tensor]] = None  # (position, output) of the last small step
    last_iterations_s: float = 0.0  # seconds of the scheduler iterations that ran its last step
    wire: Optional[str] = None  # how this session's outputs travel (config.WIRE_FORMATS); None = as computed
    lora: Optional[list] = None  # the session's LoRA (hosted or client-held): a BlockLora per block of its range
    prompts: Optional[torch.Tensor] = None  # deep prompts [blocks, prefix, hidden] (server/adapters.py)
    release_tuning: Optional[Callable[[], None]] = None  # unpins its client LoRA and prompts (AdapterStore.pin)

    @property
    def length(self) -> int:
        return self.sequences[0].length


class SessionManager:
    def __init__(self, backend: SpanBackend, scheduler: Scheduler, pool: KVPool, prefix_index: PrefixIndex, config: ServerConfig):
        self.backend = backend
        self.scheduler = scheduler
        self.pool = pool
        self.prefix_index = prefix_index
        self.config = config
        self.sessions: dict[str, ServerSession] = {}
        self._pages_freed = asyncio.Event()
        scheduler.expected_works = self.active_sessions

    def active_sessions(self, recent: float = 0.5) -> int:
        """Sessions likely to submit a step soon: with a step in flight or a pushed one on its way,
        one that returned within `recent` seconds, or opened within `recent` seconds and not
        stepped yet. Sessions that start together send their prompts within a few ms, and one
        iteration of the previous server pushes all their outputs in one message: the scheduler
        waits for them instead of running the first alone and the rest one long iteration later.
        Any thread."""
        now = time.monotonic()
        return sum(
            1
            for s in list(self.sessions.values())
            if s.inflight is not None
            or s.push_pending
            or now - s.last_step_done < recent
            or (s.steps == 0 and now - s.opened < recent)
        )

    # ---- open / close ----

    def open(self, request: OpenSession, peer_id: str, tensors: Sequence[torch.Tensor] = ()) -> ServerSession:
        """A new session from its first message; `tensors` are its deep prompts / LoRA weights, if any."""
        if request.session_id in self.sessions:
            raise ProtocolError(f"session {request.session_id!r} is already open on this server")
        limit = self.config.max_sessions_per_peer
        if sum(1 for s in self.sessions.values() if s.peer_id == peer_id) >= limit:
            raise ProtocolError(
                f"this client already has {limit} open sessions on this server "
                f"(--max_sessions_per_peer); close some or use another server",
                ErrorCode.SERVER_LIMIT,
            )
        blocks = self.backend.block_range(request.start, request.end)
        max_length, batch_size = request.max_length, request.batch_size
        if max_length <= 0 or batch_size <= 0:
            raise ProtocolError(f"max_length={max_length} and batch_size={batch_size} must be positive")
        if max_length > self.config.max_session_length:
            raise ProtocolError(f"max_length={max_length} not in (0, {self.config.max_session_length}]", ErrorCode.SERVER_LIMIT)
        if batch_size > self.config.max_batch_size:
            raise ProtocolError(f"batch_size={batch_size} not in [1, {self.config.max_batch_size}]", ErrorCode.SERVER_LIMIT)
        pad_tensor = self.backend.check_pad_lens(request.pad_lens, batch_size, max_length)
        pad_lens = [0] * batch_size if pad_tensor is None else pad_tensor.tolist()
        if request.wire is not None and request.wire not in self.config.wire_formats:
            raise ProtocolError(
                f"wire format {request.wire!r} is not supported by this server "
                f"(supported: {', '.join(self.config.wire_formats)})",
                ErrorCode.SERVER_LIMIT,
            )
        owner = "*" if self.config.share_prefix_cache else peer_id
        tuning = self.backend.adapters.resolve(request.tuning, tensors, blocks, peer_id, batch_size, max_length)
        # pages computed under another adapter never match; client-held weights and prompts change
        # with every optimizer step, so their pages are never shared at all
        private = tuning.prompts is not None or bool(tuning.lora_targets)
        scope = f"{owner}|{blocks.first}:{blocks.last}|{request.tuning.adapter or ''}" + (
            f"|{request.session_id}" if private else ""
        )
        session = ServerSession(
            request.session_id,
            peer_id,
            blocks,
            max_length,
            batch_size,
            pad_lens,
            [SequencePages() for _ in range(batch_size)],
            scope,
        )
        session.wire, session.push_token = request.wire, request.push_token
        session.lora, session.prompts = tuning.lora, tuning.prompts
        if not tuning.empty:
            session.release_tuning = self.backend.adapters.pin(peer_id, tuning)
        self.sessions[request.session_id] = session
        return session

    def offer_prefix(self, session: ServerSession, step: Step) -> None:
        """The open message's page hashes: hold the pages cached under them for the first step."""
        try:
            self._add_hashes(session, step)
        except BaseException:
            self.close(session)
            raise
        if session.hashes and session.batch_size == 1 and not any(session.pad_lens) and self.pool.page_size == PREFIX_PAGE_TOKENS:
            session.cached_pages = self.prefix_index.lookup(session.scope, session.hashes)
            self.pool.retain(session.cached_pages)  # released by the first step or by close()

    def close(self, session: ServerSession) -> None:
        """Forget the session; its pages go back once no iteration can still write into them."""
        self.sessions.pop(session.session_id, None)
        self._release_cached(session)
        if session.release_tuning is not None:
            session.release_tuning()
            session.release_tuning = None

        def release() -> None:
            for pages in session.sequences:
                pages.free(self.pool)
            self._pages_freed.set()

        if session.inflight is not None:
            session.inflight.after_done(release)
        else:
            release()

    # ---- steps ----

    def _add_hashes(self, session: ServerSession, step: Step) -> None:
        if not step.page_hashes:
            return
        hashes, start, known = step.page_hashes, step.hash_start, len(session.hashes)
        if not 0 <= start <= known or (start + len(hashes)) * self.pool.page_size > session.max_length:
            raise ProtocolError(f"page_hashes must start at a page <= {known} and fit max_length")
        if hashes[: known - start] != tuple(session.hashes[start:known][: len(hashes)]):
            raise ProtocolError("page_hashes contradict the hashes sent before")
        session.hashes.extend(hashes[known - start :])

    def check_step(self, session: ServerSession, step: Step, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The step's hidden states, checked against the session (ProtocolError otherwise)."""
        if len(tensors) != 1:
            raise ProtocolError(f"an inference step carries exactly one tensor, got {len(tensors)}")
        (hidden,) = tensors
        self.backend.check_hidden(hidden)
        batch, seq, _ = hidden.shape
        if batch != session.batch_size:
            raise ProtocolError(f"batch size {batch} differs from the session's {session.batch_size}")
        reuse = step.reuse_tokens
        if reuse:
            page_size = self.pool.page_size
            if session.steps or reuse % page_size or not 0 < reuse <= len(session.cached_pages) * page_size:
                raise ProtocolError(
                    f"reuse_tokens={reuse} must be a multiple of {page_size} within the "
                    f"{len(session.cached_pages) * page_size} cached tokens, on the first step",
                    ErrorCode.OUT_OF_SYNC,
                )
        # a step at another position can only repeat the last one (repeated_output) and adds no tokens
        position = session.length if step.position is None else step.position
        if step.rewind:
            if not 0 <= position <= session.length or session.inflight is not None:
                raise ProtocolError(
                    f"cannot rewind to position {position}: the session holds {session.length} tokens", ErrorCode.OUT_OF_SYNC
                )
            if position + seq > session.max_length:
                raise ProtocolError(f"{position} + {seq} tokens exceed the session's max_length={session.max_length}")
            self._rewind(session, position)
        elif position == session.length and session.length + reuse + seq > session.max_length:
            raise ProtocolError(f"{session.length + reuse} + {seq} tokens exceed the session's max_length={session.max_length}")
        if step.hypo_ids and position == session.length:  # not for a repeated step: it was reordered once
            self._reorder(session, step.hypo_ids)
        self._add_hashes(session, step)
        return hidden

    def _reorder(self, session: ServerSession, hypo_ids: Sequence[int]) -> None:
        """Row i of the session continues what row hypo_ids[i] holds (beam search). Rows picked twice
        share their full pages; each copy gets its own partial last page."""
        batch = session.batch_size
        if len(hypo_ids) != batch or not all(0 <= i < batch for i in hypo_ids):
            raise ProtocolError(f"hypo_ids must list {batch} rows of the session, each in [0, {batch})")
        if session.inflight is not None:
            raise ProtocolError("cannot reorder rows while a step runs", ErrorCode.OUT_OF_SYNC)
        if list(hypo_ids) == list(range(batch)):
            return
        old = session.sequences
        if session.length % self.pool.page_size:  # copies of a partial page, for rows picked twice or more
            copies = len(hypo_ids) - len(set(hypo_ids))
            try:
                self.pool.release(self.pool.allocate(copies))  # all rows or none: evicts now if it must
            except CacheExhausted as e:
                raise ProtocolError(f"{e}; retry later or on another server", ErrorCode.CACHE_FULL) from None
        rows = [old[i].share(self.pool) for i in hypo_ids]
        for row in old:
            row.free(self.pool)
        for row in rows:
            row.own_last_page(self.pool)
        session.sequences = rows
        session.pad_lens = [session.pad_lens[i] for i in hypo_ids]
        session.last_output = None
        self._pages_freed.set()

    def _rewind(self, session: ServerSession, position: int) -> None:
        """Drop the session's tokens from `position` on, in every row: their pages go back to the pool
        (shared prefix pages stay cached), and the page hashes past it are forgotten."""
        if position == session.length:
            return
        page_size = self.pool.page_size
        if position % page_size:  # a row keeps a partial page: a shared one is copied (SequencePages.truncate)
            shared = sum(self.pool.refcount(row.pages[position // page_size]) > 1 for row in session.sequences)
            try:
                self.pool.release(self.pool.allocate(shared))  # all rows or none: evicts now if it must
            except CacheExhausted as e:
                raise ProtocolError(f"{e}; retry later or on another server", ErrorCode.CACHE_FULL) from None
        for row in session.sequences:
            row.truncate(self.pool, position)
        full = position // self.pool.page_size
        del session.hashes[full:]
        session.inserted_pages = min(session.inserted_pages, full)
        session.last_output = None
        self._pages_freed.set()

    def repeated_output(self, session: ServerSession, step: Step, seq: int) -> Optional[torch.Tensor]:
        """For a step that says where it starts (position): None if it is the next one to compute,
        the kept output if it repeats the last step (a client retrying after a push it could not see
        through), and a ProtocolError for any other position."""
        position = step.position
        if position is None or position == session.length:
            return None
        last = session.last_output
        if last is not None and last[0] == position and position + seq == session.length:
            return last[1]
        raise ProtocolError(
            f"a step at position {position} does not follow the {session.length} tokens of this session", ErrorCode.OUT_OF_SYNC
        )

    async def run_step(self, session: ServerSession, hidden: torch.Tensor, reuse: int) -> torch.Tensor:
        if reuse:
            session.sequences[0].attach_prefix(self.pool, session.cached_pages[: reuse // self.pool.page_size])
        self._release_cached(session)
        await self._reserve(session, hidden.shape[1])
        work = InferenceWork(
            hidden.to(self.backend.dtype),
            session.sequences,
            session.pad_lens,
            session.blocks.first,
            session.blocks.last,
            lora=session.lora,
            prompts=session.prompts,
        )
        session.inflight = work
        session.push_pending = False
        position = session.length - reuse
        out = await self.scheduler.run_inference(work)
        session.inflight = None
        session.last_iterations_s = work.iterations_s
        session.last_step_done = time.monotonic()
        session.steps += 1
        # kept so that a repeated step (see repeated_output) costs nothing; prompts are not kept
        session.last_output = (position, out) if out.shape[1] <= KEEP_OUTPUT_TOKENS else None
        self._publish_full_pages(session)
        return out

    def _release_cached(self, session: ServerSession) -> None:
        """Drop the hold on the prefix pages offered at open (attach_prefix holds the reused ones itself)."""
        pages, session.cached_pages = session.cached_pages, []
        self.pool.release(pages)

    async def _reserve(self, session: ServerSession, new_tokens: int) -> None:
        """Pages for new_tokens more positions in every row; waits up to max_alloc_timeout for free pages."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_alloc_timeout
        while True:
            try:
                reserve_rows(self.pool, session.sequences, new_tokens, check=lambda: self._check_share(session))
                return
            except CacheExhausted as e:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ProtocolError(f"{e}; retry later or on another server", ErrorCode.CACHE_FULL) from None
                self._pages_freed.clear()
                try:
                    await asyncio.wait_for(self._pages_freed.wait(), min(remaining, 0.5))
                except asyncio.TimeoutError:
                    pass

    def _check_share(self, session: ServerSession) -> None:
        """CacheExhausted if the session's client now holds more than --max_cache_share of the pool
        while other clients hold pages too (alone, a client may use all of it)."""
        share = self.config.max_cache_share
        if share >= 1:
            return
        mine = others = 0
        for s in self.sessions.values():
            pages = sum(len(row.pages) for row in s.sequences)
            if s.peer_id == session.peer_id:
                mine += pages
            else:
                others += pages
        limit = int(share * self.pool.num_pages)
        if others and mine > limit:
            raise CacheExhausted(
                f"KV cache share used up: this client would hold {mine} of {self.pool.num_pages} "
                f"pages, and while other clients hold sessions one client may hold {limit} "
                f"(--max_cache_share {share})"
            )

    def _publish_full_pages(self, session: ServerSession) -> None:
        """Offer this session's full pages (whose hashes the client sent) to later sessions in its scope."""
        if session.batch_size != 1 or any(session.pad_lens) or self.pool.page_size != PREFIX_PAGE_TOKENS:
            return
        full = min(len(session.hashes), session.length // self.pool.page_size)
        if full > session.inserted_pages:
            self.prefix_index.insert(session.scope, session.hashes[:full], session.sequences[0].pages[:full])
            session.inserted_pages = full

    @property
    def free_tokens(self) -> int:
        return self.pool.num_free * self.pool.page_size
