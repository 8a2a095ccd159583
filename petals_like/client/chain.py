"""Chains of inference streams: opening a link per span of a route, replaying history, closing.

A link is one open rpc_inference stream to one server, with the inputs the client has sent it (its
history, kept to rebuild its KV cache elsewhere). The recovery policy (which link to replace, when
to rebuild everything) is the session's (client/inference_session.py); this module only builds.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from petals_like.client.mux import StepMuxes
from petals_like.client.transport import InferenceStream, callers_fault
from petals_like.client.tuning import RequestTuning
from petals_like.config import ClientConfig
from petals_like.data_structures import RemoteSpanInfo
from petals_like.dht.node import SwarmNode
from petals_like.routing.manager import RouteManager
from petals_like.wire import OpenReply, OpenSession, Step

logger = logging.getLogger(__name__)


@dataclass
class Link:
    span: RemoteSpanInfo
    stream: InferenceStream
    session_id: str
    push_token: str = field(default_factory=lambda: uuid.uuid4().hex)  # lets the previous server push to us
    history: list[torch.Tensor] = field(default_factory=list)  # inputs sent so far, [batch, seq_i, hidden] each
    # rebuilt by replay during the current step: its server holds the session as the client has it now,
    # so the step's own rewind and row reordering are not for it
    fresh: bool = False

    async def replay(self, inputs: torch.Tensor, *, timeout: float) -> torch.Tensor:
        """Run `inputs` (a new link's whole history) as one step; they become its history."""
        out = await self.stream.step(inputs, Step(self.session_id), timeout=timeout)
        self.history.append(inputs)
        self.fresh = True
        return out


class ChainBuilder:
    """Opens links over routes for one session: its length, batch, padding and tuning."""

    def __init__(
        self,
        node: SwarmNode,
        routes: RouteManager,
        config: ClientConfig,
        tuning: RequestTuning,
        max_length: int,
        muxes: Optional[StepMuxes] = None,
    ):
        self.node, self.routes, self.config, self.tuning = node, routes, config, tuning
        self.muxes = muxes  # the client's mux streams (client/mux.py); None: every link on its own stream
        self.max_length = max_length
        self.batch_size: Optional[int] = None  # set by the session's first step
        self.pad_lens: Optional[list[int]] = None

    async def open_link(self, span: RemoteSpanInfo, hashes: Sequence[str] = (), *, probe: bool = False) -> tuple[Link, int]:
        """Open a stream and give it the session's page hashes; with probe, also ask how many tokens of
        that hashed prefix the server holds."""
        mux = None
        if self.muxes is not None:
            mux = await self.muxes.get(span.peer_id, self.config.wire, timeout=self.config.connect_timeout)
        stream = InferenceStream(self.node.p2p, span, wire=self.config.wire, mux=mux)
        await stream.open(timeout=self.config.connect_timeout)
        link = Link(span, stream, uuid.uuid4().hex)
        stream.attach(link.session_id)
        extras = self.tuning.extras(span, with_weights=True)  # sent at every open: a replacement server needs them too
        request = OpenSession(
            session_id=link.session_id,
            start=span.start,
            end=span.end,
            max_length=self.max_length,
            batch_size=self.batch_size,
            pad_lens=None if self.pad_lens is None else tuple(self.pad_lens),
            tuning=extras.tuning,
            push_token=link.push_token,
            wire=self.config.wire,
            # a server may refuse the wire format: wait for its answer, so the refusal is what the user sees
            probe=(probe and bool(hashes)) or self.config.wire is not None,
            mux=mux.mux_id if mux is not None else None,
        )
        first = Step(link.session_id, page_hashes=tuple(hashes)) if hashes else None
        await stream.send(extras.tensors, request.to_meta(first), compress=False)
        cached = 0
        if request.probe:
            answer = await stream.read(timeout=self.config.connect_timeout)
            cached = OpenReply.from_meta(answer.metadata).cached_tokens if not answer.tensors else 0
        return link, cached

    async def open(self, start: int, end: int, hashes: Sequence[str] = (), *, probe: bool = False) -> tuple[list[Link], int]:
        """A new chain over [start, end) and the prompt tokens every server of it holds cached. A server
        that fails to open is avoided by the next route, unless the refusal was the caller's fault."""
        route = await self.routes.make_route(start, end, needed_tokens=self.max_length * (self.batch_size or 1))
        opened: list[Link] = []
        reusable = None
        span = None
        try:
            for span in route:
                link, cached = await self.open_link(span, hashes, probe=probe)
                opened.append(link)
                reusable = cached if reusable is None else min(reusable, cached)
        except BaseException as e:
            await close_all(opened)
            if isinstance(e, Exception) and span is not None:
                if refused := callers_fault(e, span):
                    raise refused from e
                self.routes.ban(span.peer_id, f"opening a session failed: {e!r}")
            raise
        self.routes.show("inference", start, end, route)
        return opened, reusable or 0


async def close_all(links: list[Link]) -> None:
    closes = (link.stream.close(Step(link.session_id).to_meta()) for link in links)
    await asyncio.gather(*closes, return_exceptions=True)
