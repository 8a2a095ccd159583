"""RPC handlers: decode, validate, submit to the scheduler, encode. No block math here.

The messages' metadata is typed in wire.py. rpc_inference is one bidirectional stream per
session and span: the first message opens the session (OpenSession) and may already carry a step;
each later message is one Step of any number of new tokens; a Step with close, or the end of the
stream, frees the session's cache. rpc_forward / rpc_backward are unary calls, with streamed
variants for messages above one P2P part. Any error is answered to the caller alone; the server
goes on serving everyone else.

rpc_inference_mux (server/mux.py) is one stream per client that carries the steps of many of its
sessions in one message and their answers in one message; the sessions are still opened, run and
closed by their own rpc_inference streams, which take the mux's steps from their inboxes.

Push: a step may carry a push_chain, the rest of the client's chain (PushHop: peer, push token,
that server's Step). The server then sends its output to the next server with rpc_push before
answering the client (StepReply.pushed); the next server runs it as if the client
had sent it, answers the client on its own stream and pushes on. Pushes to the same next server
that one iteration finished travel as one message (server.push). The token, chosen by the client
when it opened the next server's session, is what lets a server write into that session; a push
that fails or does not fit one message is answered pushed=false and the client relays the
output itself. Steps carry their position (tokens before them) so a step that arrives twice (pushed,
then relayed after a failure) is answered from the kept output instead of being run again.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import replace
from typing import AsyncIterator, Callable, Optional

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2

from petals_like import __version__
from petals_like.config import ServerConfig
from petals_like.models.moe import span_expert_stats
from petals_like.models.span import BlockRange
from petals_like.protocol import (
    PROTOCOL_VERSION,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFERENCE_MUX,
    RPC_INFO,
    RPC_PUSH,
    ErrorCode,
    Message,
    ProtocolError,
    encode_metadata,
    pack_message,
    read_message,
    unpack_message,
)
from petals_like.server.adapters import Tuning
from petals_like.server.backend import SpanBackend
from petals_like.server.mux import MAX_MUXES_PER_PEER, ServerMux, unknown_session
from petals_like.server.push import PushBatcher
from petals_like.server.runtime import Priority
from petals_like.server.scheduler import Scheduler
from petals_like.server.sessions import ServerSession, SessionManager
from petals_like.wire import (
    InfoReply,
    MuxHello,
    MuxReplies,
    MuxSteps,
    OpenReply,
    OpenSession,
    PushBatch,
    PushedStep,
    PushHop,
    PushReply,
    SpanRequest,
    Step,
    StepReply,
)

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
        self.serve(backend, scheduler, sessions)
        self.config = config
        self.info_fn = info_fn  # the live ServerInfo fields, for rpc_info
        self.p2p: Optional[P2P] = None
        self.pusher: Optional[PushBatcher] = None
        self.pushes_received = 0
        self.forward_calls = 0
        self.muxes: dict[tuple[str, str], ServerMux] = {}  # (client peer, mux id) -> its open mux stream
        self.mux_messages_received = 0
        self.mux_steps_received = 0
        self.stream_steps_received = 0  # steps clients sent on sessions' own streams (not pushed, not muxed)

    def serve(self, backend: SpanBackend, scheduler: Scheduler, sessions: SessionManager) -> None:
        """Answer with this span from now on. A server that moves to other blocks calls it with the new
        span's parts; the handlers stay registered on the node, so the peer's streams and pushes keep
        working. Requests already in flight finish (or fail) on the parts they started with."""
        self.backend, self.scheduler, self.sessions = backend, scheduler, sessions

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
        await p2p.add_protobuf_handler(
            RPC_INFERENCE_MUX, self.rpc_inference_mux, ExpertRequest, stream_input=True, stream_output=True
        )

    # ---- rpc_info ----

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        spec = self.backend.spec
        pool = self.sessions.pool
        info = InfoReply(
            protocol_version=PROTOCOL_VERSION,
            server_version=__version__,
            num_blocks=spec.num_blocks,
            hidden_size=spec.hidden_size,
            max_session_length=self.config.max_session_length,
            max_batch_size=self.config.max_batch_size,
            max_request_tokens=self.config.max_request_tokens,
            page_size=pool.page_size,
            cache_tokens_left=self.sessions.free_tokens,
            cache_tokens_total=pool.num_pages * pool.page_size,
            prefix_cache_tokens=len(self.sessions.prefix_index) * pool.page_size,
            open_sessions=len(self.sessions.sessions),
            iterations=self.scheduler.stats.iterations,
            inference_tokens=self.scheduler.stats.inference_tokens,
            busy_seconds=round(self.scheduler.stats.busy_seconds, 3),
            pushes_sent=self.pusher.pushes_sent if self.pusher else 0,
            push_messages_sent=self.pusher.messages_sent if self.pusher else 0,
            pushes_received=self.pushes_received,
            forward_calls=self.forward_calls,
            mux_messages_received=self.mux_messages_received,
            mux_steps_received=self.mux_steps_received,
            stream_steps_received=self.stream_steps_received,
            asyncio_tasks=len(asyncio.all_tasks()),
            announced=self.info_fn(),
            experts=span_expert_stats(self.backend.span),
        ).to_meta()
        return runtime_pb2.ExpertResponse(metadata=encode_metadata(info))

    # ---- forward / backward ----

    def _forward_inputs(
        self, message: Message, num_tensors: int, peer_id: str
    ) -> tuple[list[torch.Tensor], Optional[torch.Tensor], BlockRange, Tuning]:
        """The hidden states (and grad_outputs), pad_lens, blocks and the tuning tensors of a request."""
        request = SpanRequest.from_meta(message.metadata)
        blocks = self.backend.block_range(request.start, request.end)
        if len(message.tensors) < num_tensors:
            raise ProtocolError(f"expected at least {num_tensors} tensor(s), got {len(message.tensors)}")
        tensors = message.tensors[:num_tensors]
        for name, tensor in zip(("hidden_states", "grad_outputs"), tensors):
            self.backend.check_hidden(tensor, name)
        if num_tensors == 2 and tensors[0].shape != tensors[1].shape:
            raise ProtocolError("grad_outputs must have the shape of hidden_states")
        batch, seq, _ = tensors[0].shape
        pad_lens = self.backend.check_pad_lens(request.pad_lens, batch, seq)
        tuning = self.backend.adapters.resolve(request.tuning, message.tensors[num_tensors:], blocks, peer_id, batch, seq)
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
                    raise ProtocolError(f"session idle for {self.config.session_idle_timeout} s; closed", ErrorCode.SERVER_LIMIT)
                source, item = getter.result()
                if source == "error":
                    raise item
                if source in ("push", "mux"):
                    step, tensors = item
                else:
                    if item is None:
                        return
                    step = Step.from_meta(item.metadata)
                    if session is None:
                        session, reply = self._open(sessions, item, step, context.remote_id.to_base58())
                        session.inbox = inbox
                        if reply is not None:
                            yield reply
                    elif step.session_id != session.session_id:
                        raise ProtocolError(f"unknown session {step.session_id!r} on this stream")
                    if step.close:
                        return
                    tensors = item.tensors
                    self.stream_steps_received += bool(tensors)
                if not tensors and session.steps == 0:
                    continue  # an open message without a first step
                reply, out = await self._inference_step(sessions, session, step, tensors)
                if session.mux is not None:
                    session.mux.answer(session.session_id, reply, out)
                    continue
                for part in pack_message(
                    [out],
                    reply.to_meta(),
                    proto=runtime_pb2.ExpertResponse,
                    max_part_bytes=self.config.max_part_bytes,
                    wire=session.wire,
                ):
                    yield part
        except Exception as e:
            if session is not None and session.mux is not None:
                session.mux.fail(session.session_id, e)  # the client reads this session's answers there
            raise
        finally:
            reader.cancel()
            if session is not None:
                sessions.close(session)
                if session.mux is not None:
                    session.mux.sessions.pop(session.session_id, None)

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

    def _open(
        self, sessions: SessionManager, message: Message, step: Step, peer_id: str
    ) -> tuple[ServerSession, Optional[runtime_pb2.ExpertResponse]]:
        """The session a stream's first message opens, and the answer to send at once if it asked (probe)."""
        request = OpenSession.from_meta(message.metadata)
        mux = None
        if request.mux is not None:
            mux = self.muxes.get((peer_id, request.mux))
            if mux is None or mux.wire != request.wire:
                raise ProtocolError(f"no mux stream {request.mux!r} of this peer with wire format {request.wire!r} is open")
        try:
            # with deep prompts or LoRA weights, the opening message's tensors are those, not a step
            session = sessions.open(request, peer_id, message.tensors if request.tuning.carries_tensors else ())
            if request.tuning.carries_tensors:
                message.tensors = []
            sessions.offer_prefix(session, step)
        except Exception as e:
            if mux is not None:  # the client reads this session's answers there: the refusal too
                mux.fail(request.session_id, e)
            raise
        if mux is not None:
            session.mux = mux
            mux.sessions[session.session_id] = session
        if not request.probe:
            return session, None
        # say how much of the client's hashed prefix is cached here
        reply = OpenReply(len(session.cached_pages) * sessions.pool.page_size)
        return session, runtime_pb2.ExpertResponse(metadata=encode_metadata(reply.to_meta()))

    async def _inference_step(
        self, sessions: SessionManager, session: ServerSession, step: Step, tensors: list[torch.Tensor]
    ) -> tuple[StepReply, torch.Tensor]:
        hidden = sessions.check_step(session, step, tensors)
        started = time.perf_counter()
        position = session.length
        out = sessions.repeated_output(session, step, hidden.shape[1])
        repeated = out is not None
        if out is None:
            out = await sessions.run_step(session, hidden, step.reuse_tokens)
        else:
            session.push_pending = False
            position = step.position
        out = out.to(hidden.dtype)
        pushed = await self._push(out, step.push_chain, session.wire) if step.push_chain and not repeated else None
        iterations_s = 0.0 if repeated else session.last_iterations_s
        return StepReply(position, session.steps, pushed, time.perf_counter() - started, iterations_s), out

    # ---- many sessions' steps on one stream ----

    async def rpc_inference_mux(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """server/mux.py: the first message (MuxHello) is answered with an empty MuxReplies once the
        mux can be named by sessions; later messages' steps go to their sessions' inboxes."""
        peer_id = context.remote_id.to_base58()
        first = await read_message(requests, max_bytes=self.config.max_message_bytes)
        if first is None:
            return
        hello = MuxHello.from_meta(first.metadata)
        key = (peer_id, hello.mux_id)
        if key in self.muxes:
            raise ProtocolError(f"mux {hello.mux_id!r} is already open")
        if sum(peer == peer_id for peer, _ in self.muxes) >= MAX_MUXES_PER_PEER:
            raise ProtocolError(f"this client already has {MAX_MUXES_PER_PEER} mux streams open here", ErrorCode.SERVER_LIMIT)
        if hello.wire is not None and hello.wire not in self.config.wire_formats:
            raise ProtocolError(f"wire format {hello.wire!r} is not supported by this server", ErrorCode.SERVER_LIMIT)
        mux = self.muxes[key] = ServerMux(hello.mux_id, peer_id, hello.wire, self.config.max_part_bytes)
        reader = asyncio.create_task(self._read_mux(requests, mux))
        try:
            yield runtime_pb2.ExpertResponse(metadata=encode_metadata(MuxReplies().to_meta()))
            async for part in mux.outgoing():
                yield part
        finally:
            mux.close()
            reader.cancel()
            self.muxes.pop(key, None)

    async def _read_mux(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], mux: ServerMux) -> None:
        """A mux's client messages: each step to its session's inbox, or an error for that step alone."""
        try:
            while True:
                message = await read_message(requests, max_bytes=self.config.max_message_bytes)
                if message is None:
                    break
                self.mux_messages_received += 1
                steps = MuxSteps.from_meta(message.metadata, len(message.tensors)).steps
                self.mux_steps_received += len(steps)
                for step, tensor in zip(steps, message.tensors):
                    session = mux.sessions.get(step.session_id)
                    if session is None or session.inbox is None:
                        mux.fail(step.session_id, unknown_session(step.session_id))
                        continue
                    session.inbox.put_nowait(("mux", (replace(step, close=False), [tensor])))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a malformed message: the client's sessions on this mux cannot go on
            logger.debug(f"Mux stream of {mux.peer_id[-6:]} failed: {e!r}")
        mux.close()

    # ---- server-to-server push ----

    async def _push(self, out: torch.Tensor, chain: tuple[PushHop, ...], wire: Optional[str]) -> bool:
        """Send a step's output to the next server of the client's chain; False if it did not take it.
        The next server gets the rest of the chain and pushes on in turn."""
        hop = chain[0]
        try:
            peer = PeerID.from_base58(hop.peer)
        except Exception as e:  # the client sends the output itself
            logger.debug(f"Push refused: {e!r}")
            return False
        return await self.pusher.push(peer, PushedStep(replace(hop.step, push_chain=chain[1:]), hop.token), out, wire)

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Steps pushed by the previous server of clients' chains, each checked against its session's token.

        Answers {"accepted": [bool per push]}: one push refused does not refuse the others."""
        message = unpack_message(request, max_bytes=self.config.max_message_bytes)
        batch = PushBatch.from_meta(message.metadata, len(message.tensors))
        accepted = []
        for pushed, tensor in zip(batch.pushes, message.tensors):
            try:
                if pushed is None:
                    raise ProtocolError("malformed push")
                self._accept_push(pushed, tensor)
                accepted.append(True)
            except ProtocolError as e:
                logger.debug(f"Push refused: {e}")
                accepted.append(False)
        return runtime_pb2.ExpertResponse(metadata=encode_metadata(PushReply(tuple(accepted)).to_meta()))

    def _accept_push(self, pushed: PushedStep, tensor: torch.Tensor) -> None:
        session = self.sessions.sessions.get(pushed.step.session_id)
        token = pushed.token.encode()
        if session is None or session.push_token is None or not hmac.compare_digest(token, session.push_token.encode()):
            raise ProtocolError("no session with this id accepts pushes with this token")
        step = pushed.step
        expected = step.position == session.length or (
            step.rewind and step.position is not None and step.position < session.length
        )
        if session.inbox is None or session.inflight is not None or not expected:
            raise ProtocolError("the session is not waiting for this step")
        self.pushes_received += 1
        session.push_pending = True  # the scheduler waits for it with the rest of this message's steps
        session.inbox.put_nowait(("push", (replace(pushed.step, close=False), [tensor])))
