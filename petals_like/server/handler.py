"""RPC handlers: decode, validate, submit to the scheduler, encode. No block math here.

rpc_inference is one bidirectional stream per session and span: the first message opens the
session (session_id, start, end, max_length, optional pad_lens) and may already carry a step;
each later message is one step of any number of new tokens; {"close": true} or the end of the
stream frees the session's cache. rpc_forward / rpc_backward are unary calls, with streamed
variants for messages above one P2P part. Any error is answered to the caller alone; the server
goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator, Callable, Optional

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2

from petals_like import __version__
from petals_like.config import ServerConfig
from petals_like.protocol import (
    PROTOCOL_VERSION,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    Message,
    ProtocolError,
    encode_metadata,
    pack_message,
    read_message,
    require,
    unpack_message,
)
from petals_like.server.backend import BlockRange, SpanBackend
from petals_like.server.runtime import Priority
from petals_like.server.scheduler import Scheduler
from petals_like.server.sessions import ServerSession, SessionManager

logger = logging.getLogger(__name__)

class Handlers:
    def __init__(
        self,
        backend: SpanBackend,
        scheduler: Scheduler,
        sessions: SessionManager,
        config: ServerConfig,
        info_fn: Callable[[], dict],
    ):
        self.backend = backend
        self.scheduler = scheduler
        self.sessions = sessions
        self.config = config
        self.info_fn = info_fn  # the live ServerInfo fields, for rpc_info

    async def register(self, p2p: P2P) -> None:
        ExpertRequest = runtime_pb2.ExpertRequest
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, ExpertRequest)
        await p2p.add_protobuf_handler(RPC_FORWARD, self.rpc_forward, ExpertRequest)
        await p2p.add_protobuf_handler(RPC_BACKWARD, self.rpc_backward, ExpertRequest)
        await p2p.add_protobuf_handler(RPC_FORWARD + "_stream", self.rpc_forward_stream, ExpertRequest,
                                       stream_input=True, stream_output=True)  # fmt: skip
        await p2p.add_protobuf_handler(RPC_BACKWARD + "_stream", self.rpc_backward_stream, ExpertRequest,
                                       stream_input=True, stream_output=True)  # fmt: skip
        await p2p.add_protobuf_handler(RPC_INFERENCE, self.rpc_inference, ExpertRequest,
                                       stream_input=True, stream_output=True)  # fmt: skip

    # ---- rpc_info ----

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        spec = self.backend.spec
        info = dict(
            self.info_fn(),
            protocol_version=PROTOCOL_VERSION,
            server_version=__version__,
            num_blocks=spec.num_blocks,
            hidden_size=spec.hidden_size,
            max_session_length=self.config.max_session_length,
            max_batch_size=self.config.max_batch_size,
            max_request_tokens=self.config.max_request_tokens,
            cache_tokens_left=self.sessions.free_tokens,
            page_size=self.sessions.pool.page_size,
            open_sessions=len(self.sessions.sessions),
            iterations=self.scheduler.stats.iterations,
            inference_tokens=self.scheduler.stats.inference_tokens,
            busy_seconds=round(self.scheduler.stats.busy_seconds, 3),
        )
        return runtime_pb2.ExpertResponse(metadata=encode_metadata(info))

    # ---- forward / backward ----

    def _forward_inputs(self, message: Message, num_tensors: int) -> tuple[list[torch.Tensor], Optional[torch.Tensor], BlockRange]:
        meta = message.metadata
        blocks = self.backend.block_range(require(meta, "start", int), require(meta, "end", int))
        if len(message.tensors) != num_tensors:
            raise ProtocolError(f"expected {num_tensors} tensor(s), got {len(message.tensors)}")
        for name, tensor in zip(("hidden_states", "grad_outputs"), message.tensors):
            self.backend.check_hidden(tensor, name)
        if num_tensors == 2 and message.tensors[0].shape != message.tensors[1].shape:
            raise ProtocolError("grad_outputs must have the shape of hidden_states")
        batch, seq, _ = message.tensors[0].shape
        pad_lens = self.backend.check_pad_lens(meta.get("pad_lens"), batch, seq)
        return message.tensors, pad_lens, blocks

    async def _forward(self, message: Message) -> list[runtime_pb2.ExpertResponse]:
        (hidden,), pad_lens, blocks = self._forward_inputs(message, 1)
        out = await asyncio.wait_for(
            self.scheduler.submit(Priority.FORWARD, self.backend.forward, hidden, pad_lens, blocks),
            self.config.request_timeout,
        )
        return pack_message([out], proto=runtime_pb2.ExpertResponse, max_part_bytes=self.config.max_part_bytes)

    async def _backward(self, message: Message) -> list[runtime_pb2.ExpertResponse]:
        (hidden, grad_out), pad_lens, blocks = self._forward_inputs(message, 2)
        grad = await asyncio.wait_for(
            self.scheduler.submit(Priority.BACKWARD, self.backend.backward, hidden, grad_out, pad_lens, blocks),
            self.config.request_timeout,
        )
        return pack_message([grad], proto=runtime_pb2.ExpertResponse, max_part_bytes=self.config.max_part_bytes)

    async def _unary(self, request: runtime_pb2.ExpertRequest, run) -> runtime_pb2.ExpertResponse:
        message = unpack_message(request, max_bytes=self.config.max_message_bytes)
        parts = await run(message)
        if len(parts) != 1:  # the answer is as large as the request, which fit in one part
            raise ProtocolError("response too large for a unary call; use the streamed variant")
        return parts[0]

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._unary(request, self._forward)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._unary(request, self._backward)

    async def _streamed(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], run) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        message = await read_message(requests, max_bytes=self.config.max_message_bytes)
        if message is None:
            raise ProtocolError("empty request stream")
        for part in await run(message):
            yield part

    def rpc_forward_stream(self, requests, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return self._streamed(requests, self._forward)

    def rpc_backward_stream(self, requests, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return self._streamed(requests, self._backward)

    # ---- inference ----

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session: Optional[ServerSession] = None  # this stream's session: the only one it can reach
        try:
            while True:
                try:
                    message = await asyncio.wait_for(
                        read_message(requests, max_bytes=self.config.max_message_bytes),
                        self.config.session_idle_timeout,
                    )
                except asyncio.TimeoutError:
                    raise ProtocolError(f"session idle for {self.config.session_idle_timeout} s; closed") from None
                if message is None:
                    return
                meta = message.metadata
                if session is None:
                    session = self.sessions.open(meta, context.remote_id.to_base58())
                    if meta.get("probe") is True:  # say how much of the client's hashed prefix is cached here
                        yield runtime_pb2.ExpertResponse(metadata=encode_metadata(
                            {"cached_tokens": len(session.cached_pages) * self.sessions.pool.page_size}))
                elif require(meta, "session_id", str) != session.session_id:
                    raise ProtocolError(f"unknown session {meta['session_id']!r} on this stream")
                if meta.get("close"):
                    return
                if not message.tensors and session.steps == 0:
                    continue  # an open message without a first step
                hidden, reuse = self.sessions.check_step(session, message)
                started = time.perf_counter()
                out = await self.sessions.run_step(session, hidden, reuse)
                step_meta = {"step": session.steps, "compute_s": time.perf_counter() - started}
                for part in pack_message([out.to(hidden.dtype)], step_meta, proto=runtime_pb2.ExpertResponse,
                                         max_part_bytes=self.config.max_part_bytes):  # fmt: skip
                    yield part
        finally:
            if session is not None:
                self.sessions.close(session)
