"""InferenceSession: a chain of open inference streams whose servers hold this session's KV cache.

The client keeps, for every span of the chain, the hidden states it has sent there (its input
history). When a server fails, only its span is replaced: a new route for the same blocks is
opened and the history is replayed through it to rebuild the KV cache, then the step goes on.
The outputs do not change, because the replacement computes the same blocks on the same inputs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Optional

import torch

from petals_like.client.transport import InferenceStream
from petals_like.config import ClientConfig
from petals_like.data_structures import RemoteSpanInfo
from petals_like.dht.node import SwarmNode
from petals_like.routing.manager import RouteManager

logger = logging.getLogger(__name__)


@dataclass
class _SpanSession:
    span: RemoteSpanInfo
    stream: InferenceStream
    session_id: str
    history: list[torch.Tensor] = field(default_factory=list)  # inputs sent so far, [batch, seq_i, hidden] each


class InferenceSession:
    def __init__(self, node: SwarmNode, routes: RouteManager, config: ClientConfig, *, max_length: int,
                 num_blocks: int):  # fmt: skip
        self.node = node
        self.routes = routes
        self.config = config
        self.max_length = max_length
        self.num_blocks = num_blocks
        self.position = 0  # tokens processed by every span so far
        self.batch_size: Optional[int] = None
        self.pad_lens: Optional[list[int]] = None
        self.last_token_ids: Optional[torch.Tensor] = None  # sampled but not yet sent (used by generate)
        self.finished: Optional[torch.Tensor] = None  # [batch] bool: sequences that produced EOS (used by generate)
        self._chain: list[_SpanSession] = []
        self.closed = False
        self.num_failovers = 0

    # ---- public, synchronous ----

    def step(self, hidden: torch.Tensor, *, pad_lens: Optional[list[int]] = None) -> torch.Tensor:
        """Run new tokens' hidden states [batch, seq, hidden] through every block; returns the same shape."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        if hidden.ndim != 3:
            raise ValueError(f"hidden states must be [batch, seq, hidden], got {tuple(hidden.shape)}")
        if self.batch_size is None:
            self.batch_size, self.pad_lens = hidden.shape[0], pad_lens
        elif hidden.shape[0] != self.batch_size:
            raise ValueError(f"batch size {hidden.shape[0]} differs from the session's {self.batch_size}")
        elif pad_lens is not None and any(pad_lens):
            raise ValueError("pad_lens apply to the first step of a session only")
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(f"{self.position} + {hidden.shape[1]} tokens exceed the session's max_length={self.max_length}")
        out = self.node.run(self._step(hidden.detach().cpu()), timeout=self.config.request_timeout * (1 + self.config.max_retries))
        self.position += hidden.shape[1]
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.node.run(self._close_all(self._chain), timeout=10)
        except Exception as e:
            logger.debug(f"Closing an inference session: {e!r}")

    def __enter__(self) -> InferenceSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals, on the node's loop ----

    async def _open(self, span: RemoteSpanInfo) -> _SpanSession:
        stream = InferenceStream(self.node.p2p, span)
        await stream.open(timeout=self.config.connect_timeout)
        session = _SpanSession(span, stream, uuid.uuid4().hex)
        await stream.send([], self._open_metadata(session))
        return session

    def _open_metadata(self, session: _SpanSession) -> dict:
        return dict(session_id=session.session_id, start=session.span.start, end=session.span.end,
                    max_length=self.max_length, batch_size=self.batch_size, pad_lens=self.pad_lens)  # fmt: skip

    async def _open_chain(self, start: int, end: int) -> list[_SpanSession]:
        route = await self.routes.make_route(start, end)
        opened: list[_SpanSession] = []
        try:
            for span in route:
                opened.append(await self._open(span))
        except BaseException:
            await self._close_all(opened)
            raise
        logger.info(f"Inference chain for blocks {start}:{end}: {route}")
        return opened

    async def _step(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self._chain:
            self._chain = await self._open_chain(0, self.num_blocks)
        index = 0
        attempts = 0
        while index < len(self._chain):
            link = self._chain[index]
            try:
                out = await link.stream.step(hidden, {"session_id": link.session_id}, timeout=self.config.request_timeout)
            except (Exception, asyncio.CancelledError) as e:
                if isinstance(e, asyncio.CancelledError) and asyncio.current_task().cancelling():
                    raise
                attempts += 1
                if attempts > self.config.max_retries:
                    raise RuntimeError(f"inference step failed {attempts} times; last error: {e!r}") from e
                self.routes.ban(link.span.peer_id, repr(e))
                await self._replace(index)
                continue
            self.routes.succeeded(link.span.peer_id)
            link.history.append(hidden)
            hidden = out
            index += 1
        return hidden

    async def _replace(self, index: int) -> None:
        """Swap the span at `index` for a new chain over the same blocks, rebuilding its KV cache."""
        failed = self._chain[index]
        await self._close_all([failed])
        last_error: Optional[BaseException] = None
        for _ in range(self.config.max_retries):
            replacement: list[_SpanSession] = []
            link: Optional[_SpanSession] = None
            try:
                await self.routes.refresh(force=True)
                replacement = await self._open_chain(failed.span.start, failed.span.end)
                replayed = torch.cat(failed.history, dim=1) if failed.history else None
                for link in replacement:
                    if replayed is None:
                        break
                    out = await link.stream.step(replayed, {"session_id": link.session_id},
                                                 timeout=self.config.request_timeout)  # fmt: skip
                    link.history.append(replayed)
                    replayed = out
            except Exception as e:
                last_error = e
                logger.warning(f"Replacing span {failed.span.start}:{failed.span.end} failed: {e!r}")
                if link is not None:
                    self.routes.ban(link.span.peer_id, repr(e))
                await self._close_all(replacement)
                continue
            self.num_failovers += 1
            self._chain[index : index + 1] = replacement
            return
        raise RuntimeError(f"could not replace span {failed.span.start}:{failed.span.end}: {last_error!r}")

    async def _close_all(self, chain: list[_SpanSession]) -> None:
        await asyncio.gather(*(link.stream.close({"session_id": link.session_id}) for link in chain),
                             return_exceptions=True)  # fmt: skip
