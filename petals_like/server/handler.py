"""RPC handlers: decode, validate, submit to the scheduler, encode. No block math here.

rpc_inference is one bidirectional stream per session and span: the first message opens the
session (session_id, start, end, max_length, optional pad_lens) and may already carry a step;
each later message is one step of any number of new tokens; {"close": true} or the end of the
stream frees the session's cache. rpc_forward / rpc_backward are unary calls, with streamed
variants for messages above one P2P part. Any error is answered to the caller alone; the server
goes on serving everyone else.

Push: a step may carry "push_chain", the rest of the client's chain (peer, push token, that
server's step metadata per hop). The server then sends its output to the next server with
rpc_push before answering the client ({"pushed": true}); the next server runs it as if the client
had sent it, answers the client on its own stream and pushes on. Pushes to the same next server
that one iteration finished travel as one message (server.push). The token, chosen by the client
when it opened the next server's session, is what lets a server write into that session; a push
that fails or does not fit one message is answered {"pushed": false} and the client relays the
output itself. Steps carry "position" (tokens before them) so a step that arrives twice (pushed,
then relayed after a failure) is answered from the kept output instead of being run again.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, AsyncIterator, Callable, Optional

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from petals_like import __version__
from petals_like.config import ServerConfig
from petals_like.protocol import (
    PROTOCOL_VERSION,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    Message,
    ProtocolError,
    encode_metadata,
    pack_message,
    read_message,
    require,
    unpack_message,
)
from petals_like.server.adapters import Tuning
from petals_like.server.backend import BlockRange, SpanBackend
from petals_like.server.push import MAX_PUSH_BATCH, PushBatcher
from petals_like.server.runtime import Priority
from petals_like.server.scheduler import Scheduler
from petals_like.server.sessions import ServerSession, SessionManager

logger = logging.getLogger(__name__)

MAX_PUSH_CHAIN = 64  # hops in one push chain; longer chains are nonsense


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
        self.p2p: Optional[P2P] = None
        self.pusher: Optional[PushBatcher] = None
        self.pushes_received = 0
        self.forward_calls = 0

    async def register(self, p2p: P2P) -> None:
        self.p2p = p2p
        self.pusher = PushBatcher(p2p, self.config)
        ExpertRequest = runtime_pb2.ExpertRequest
        await p2p.add_protobuf_handler(RPC_PUSH, self.rpc_push, ExpertRequest)
        await p2p.add_protobuf_handler(RPC_INFO, self.rpc_info, ExpertRequest)
        await p2p.add_protobuf_handler(RPC_FORWARD, self.rpc_forward, ExpertRequest)
        await p2p.add_protobuf_handler(RPC_BACKWARD, self.rpc_backward, ExpertRequest)
        await p2p.add_protobuf_handler(
            RPC_FORWARD + "_stream", self.rpc_forward_stream, ExpertRequest, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(
            RPC_BACKWARD + "_stream", self.rpc_backward_stream, ExpertRequest, stream_input=True, stream_output=True
        )
        await p2p.add_protobuf_handler(RPC_INFERENCE, self.rpc_inference, ExpertRequest, stream_input=True, stream_output=True)

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
            pushes_sent=self.pusher.pushes_sent if self.pusher else 0,
            push_messages_sent=self.pusher.messages_sent if self.pusher else 0,
            pushes_received=self.pushes_received,
            forward_calls=self.forward_calls,
            # for health checks: with no session open, free + prefix-cached pages make the whole pool,
            # and the loop's task count returns to its idle level (a leak shows as growth)
            cache_tokens_total=self.sessions.pool.num_pages * self.sessions.pool.page_size,
            prefix_cache_tokens=len(self.sessions.prefix_index) * self.sessions.pool.page_size,
            asyncio_tasks=len(asyncio.all_tasks()),
        )
        return runtime_pb2.ExpertResponse(metadata=encode_metadata(info))

    # ---- forward / backward ----

    def _forward_inputs(
        self, message: Message, num_tensors: int, peer_id: str
    ) -> tuple[list[torch.Tensor], Optional[torch.Tensor], BlockRange, Tuning]:
        """The hidden states (and grad_outputs), pad_lens, blocks and the tuning tensors of a request."""
        meta = message.metadata
        blocks = self.backend.block_range(require(meta, "start", int), require(meta, "end", int))
        if len(message.tensors) < num_tensors:
            raise ProtocolError(f"expected at least {num_tensors} tensor(s), got {len(message.tensors)}")
        tensors = message.tensors[:num_tensors]
        for name, tensor in zip(("hidden_states", "grad_outputs"), tensors):
            self.backend.check_hidden(tensor, name)
        if num_tensors == 2 and tensors[0].shape != tensors[1].shape:
            raise ProtocolError("grad_outputs must have the shape of hidden_states")
        batch, seq, _ = tensors[0].shape
        pad_lens = self.backend.check_pad_lens(meta.get("pad_lens"), batch, seq)
        tuning = self.backend.adapters.resolve(meta, message.tensors[num_tensors:], blocks, peer_id, batch, seq)
        return tensors, pad_lens, blocks, tuning

    async def _forward(self, message: Message, peer_id: str) -> list[runtime_pb2.ExpertResponse]:
        (hidden,), pad_lens, blocks, tuning = self._forward_inputs(message, 1, peer_id)
        self.forward_calls += 1
        out = await asyncio.wait_for(
            self.scheduler.submit(Priority.FORWARD, self.backend.forward, hidden, pad_lens, blocks, tuning),
            self.config.request_timeout,
        )
        return pack_message([out], proto=runtime_pb2.ExpertResponse, max_part_bytes=self.config.max_part_bytes)

    async def _backward(self, message: Message, peer_id: str) -> list[runtime_pb2.ExpertResponse]:
        (hidden, grad_out), pad_lens, blocks, tuning = self._forward_inputs(message, 2, peer_id)
        grads = await asyncio.wait_for(
            self.scheduler.submit(Priority.BACKWARD, self.backend.backward, hidden, grad_out, pad_lens, blocks, tuning),
            self.config.request_timeout,
        )
        return pack_message(grads, proto=runtime_pb2.ExpertResponse, max_part_bytes=self.config.max_part_bytes)

    async def _unary(self, request: runtime_pb2.ExpertRequest, context: P2PContext, run) -> runtime_pb2.ExpertResponse:
        message = unpack_message(request, max_bytes=self.config.max_message_bytes)
        parts = await run(message, context.remote_id.to_base58())
        if len(parts) != 1:  # e.g. LoRA gradients of a request whose weights were cached
            raise ProtocolError("response too large for a unary call; use the streamed variant")
        return parts[0]

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._unary(request, context, self._forward)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._unary(request, context, self._backward)

    async def _streamed(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext, run
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        message = await read_message(requests, max_bytes=self.config.max_message_bytes)
        if message is None:
            raise ProtocolError("empty request stream")
        for part in await run(message, context.remote_id.to_base58()):
            yield part

    def rpc_forward_stream(self, requests, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return self._streamed(requests, context, self._forward)

    def rpc_backward_stream(self, requests, context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        return self._streamed(requests, context, self._backward)

    # ---- inference ----

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session: Optional[ServerSession] = None  # this stream's session: the only one it can reach
        # bound for the stream's life: after the server moves to other blocks, this session's steps
        # fail (its scheduler is stopped) instead of running on the new span's blocks and pages
        sessions = self.sessions
        # the client's messages and steps pushed by the previous server meet in one queue
        inbox: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(self._read_into(requests, inbox))
        try:
            while True:
                # not asyncio.wait_for: before Python 3.12 it returns a message that arrives as the
                # client disconnects and drops the cancellation, and the session then lingers idle
                getter = asyncio.ensure_future(inbox.get())
                try:
                    done, _ = await asyncio.wait({getter}, timeout=self.config.session_idle_timeout)
                finally:
                    getter.cancel()  # a no-op once it is done
                if not done:
                    raise ProtocolError(f"session idle for {self.config.session_idle_timeout} s; closed")
                source, message = getter.result()
                if source == "error":
                    raise message
                if message is None:
                    return
                meta = message.metadata
                if session is None:
                    # with deep prompts or LoRA weights, the opening message's tensors are those, not a step
                    extras = bool(meta.get("deep_prompts") or meta.get("lora"))
                    session = sessions.open(meta, context.remote_id.to_base58(), message.tensors if extras else ())
                    if extras:
                        message.tensors = []
                    session.inbox = inbox
                    if meta.get("probe") is True:  # say how much of the client's hashed prefix is cached here
                        yield runtime_pb2.ExpertResponse(
                            metadata=encode_metadata({"cached_tokens": len(session.cached_pages) * sessions.pool.page_size})
                        )
                elif require(meta, "session_id", str) != session.session_id:
                    raise ProtocolError(f"unknown session {meta['session_id']!r} on this stream")
                if meta.get("close") and source == "client":
                    return
                if not message.tensors and session.steps == 0:
                    continue  # an open message without a first step
                for part in await self._inference_step(sessions, session, message):
                    yield part
        finally:
            reader.cancel()
            if session is not None:
                sessions.close(session)

    async def _read_into(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], inbox: asyncio.Queue) -> None:
        """The client's side of an inference stream, message by message, into the session's inbox."""
        try:
            while True:
                message = await read_message(requests, max_bytes=self.config.max_message_bytes)
                await inbox.put(("client", message))
                if message is None:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # malformed input: the session loop answers it and closes
            await inbox.put(("error", e))

    async def _inference_step(
        self, sessions: SessionManager, session: ServerSession, message: Message
    ) -> list[runtime_pb2.ExpertResponse]:
        hidden, reuse = sessions.check_step(session, message)
        meta = message.metadata
        started = time.perf_counter()
        position = session.length
        out = sessions.repeated_output(session, meta, hidden.shape[1])
        repeated = out is not None
        if out is None:
            out = await sessions.run_step(session, hidden, reuse)
        else:
            session.push_pending = False
            position = require(meta, "position", int)
        out = out.to(hidden.dtype)
        step_meta = {"step": session.steps, "position": position, "compute_s": time.perf_counter() - started}
        chain = meta.get("push_chain")
        if chain and not repeated:
            step_meta["pushed"] = await self._push(out, chain, session.wire)
        return pack_message(
            [out], step_meta, proto=runtime_pb2.ExpertResponse, max_part_bytes=self.config.max_part_bytes, wire=session.wire
        )

    # ---- server-to-server push ----

    async def _push(self, out: torch.Tensor, chain: Any, wire: Optional[str]) -> bool:
        """Send a step's output to the next server of the client's chain; False if it did not take it.

        chain = [{"peer": peer id, "token": push token, "meta": that server's step metadata}, ...];
        the next server gets the rest of the chain and pushes on in turn.
        """
        try:
            if not isinstance(chain, list) or not chain or len(chain) > MAX_PUSH_CHAIN:
                raise ProtocolError(f"push_chain must be a list of 1..{MAX_PUSH_CHAIN} hops")
            hop = chain[0]
            if not isinstance(hop, dict):
                raise ProtocolError("each push_chain hop must be a map")
            peer = PeerID.from_base58(require(hop, "peer", str))
            meta = dict(require(hop, "meta", dict), push_token=require(hop, "token", str), push_chain=chain[1:])
        except Exception as e:  # the client sends the output itself
            logger.debug(f"Push refused: {e!r}")
            return False
        return await self.pusher.push(peer, meta, out, wire)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Steps pushed by the previous server of clients' chains, each checked against its session's token.

        Answers {"accepted": [bool per push]}: one push refused does not refuse the others."""
        message = unpack_message(request, max_bytes=self.config.max_message_bytes)
        pushes = require(message.metadata, "pushes", list)
        if not 1 <= len(pushes) <= MAX_PUSH_BATCH or len(pushes) != len(message.tensors):
            raise ProtocolError(f"pushes must list 1..{MAX_PUSH_BATCH} steps, one per tensor")
        accepted = []
        for meta, tensor in zip(pushes, message.tensors):
            try:
                self._accept_push(meta, tensor)
                accepted.append(True)
            except ProtocolError as e:
                logger.debug(f"Push refused: {e}")
                accepted.append(False)
        return runtime_pb2.ExpertResponse(metadata=encode_metadata({"accepted": accepted}))

    def _accept_push(self, meta: Any, tensor: torch.Tensor) -> None:
        if not isinstance(meta, dict):
            raise ProtocolError("each push must be a map")
        session = self.sessions.sessions.get(require(meta, "session_id", str))
        token = require(meta, "push_token", str)
        if session is None or session.push_token is None or not hmac.compare_digest(token.encode(), session.push_token.encode()):
            raise ProtocolError("no session with this id accepts pushes with this token")
        if session.inbox is None or session.inflight is not None or require(meta, "position", int) != session.length:
            raise ProtocolError("the session is not waiting for this step")
        meta = {k: v for k, v in meta.items() if k not in ("close", "probe", "push_token")}
        self.pushes_received += 1
        session.push_pending = True  # the scheduler waits for it with the rest of this message's steps
        session.inbox.put_nowait(("push", Message([tensor], meta)))
