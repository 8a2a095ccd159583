"""Calls to one server: rpc_forward, rpc_backward, and the inference stream (rpc_info: protocol.call_info).

Messages that fit one P2P part go unary (one round trip); larger ones use the streamed variants.
A server's refusal carries an ErrorCode (protocol.py); `callers_fault` tells the client's retry
loops which failures are the caller's own (raise at once, blame no server) and which are the
server's (avoid it, try another, replay).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from petals_like.client.mux import MAX_RESPONSE_BYTES, StepMux, read_responses
from petals_like.config import DEFAULT_MAX_PART_BYTES
from petals_like.data_structures import RemoteSpanInfo
from petals_like.protocol import (
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    ErrorCode,
    Message,
    ProtocolError,
    all_finite,
    pack_message,
    read_message,
    refusal_code,
    unpack_message,
    wire_nbytes,
)
from petals_like.wire import SpanRequest, Step, StepReply, TuningRef

REFUSAL_WAIT = 2.0  # seconds to wait for the reason a server closed a session's stream at its first step


class RequestRefused(ValueError):
    """A server refused the request as malformed (ErrorCode.BAD_REQUEST): the same request would fail
    on every server, so the client raises it to its caller instead of retrying elsewhere."""


def callers_fault(error: BaseException, span: RemoteSpanInfo) -> Optional[RequestRefused]:
    """The error to raise to the caller if `error` is a refusal of the caller's own request, else None."""
    if refusal_code(error) is ErrorCode.BAD_REQUEST:
        return RequestRefused(f"server {span.peer_id[-6:]} (blocks {span.start}:{span.end}) refused the request: {error}")
    return None


@dataclass
class SpanExtras:
    """What a forward/backward request carries besides the hidden states (server/adapters.py).

    tensors: sent after the hidden states (and grad_outputs); tuning: what the request names;
    grad_like: the tensors whose gradients backward returns after the hidden states', in order.
    """

    tensors: list[torch.Tensor] = field(default_factory=list)
    tuning: TuningRef = field(default_factory=TuningRef)
    grad_like: list[torch.Tensor] = field(default_factory=list)


NO_EXTRAS = SpanExtras()


async def _call(
    p2p: P2P, peer_id: str, name: str, tensors: list[torch.Tensor], metadata: dict, timeout: float, response_bytes: int = 0
) -> Message:
    """One request; unary when it fits one part and so does the expected response, else streamed."""
    parts = pack_message(tensors, metadata, max_part_bytes=DEFAULT_MAX_PART_BYTES)
    peer = PeerID.from_base58(peer_id)

    async def run() -> Message:
        if len(parts) == 1 and response_bytes < DEFAULT_MAX_PART_BYTES - (1 << 16):
            response = await p2p.call_protobuf_handler(peer, name, parts[0], runtime_pb2.ExpertResponse)
            return unpack_message(response, max_bytes=MAX_RESPONSE_BYTES)
        responses = await p2p.iterate_protobuf_handler(peer, name + "_stream", _aiter(parts), runtime_pb2.ExpertResponse)
        message = await read_message(responses, max_bytes=MAX_RESPONSE_BYTES)
        if message is None:
            raise ProtocolError(f"{name} returned no response", code=None)
        return message

    return await asyncio.wait_for(run(), timeout)


async def call_forward(
    p2p: P2P,
    span: RemoteSpanInfo,
    hidden: torch.Tensor,
    pad_lens: Optional[list[int]],
    *,
    timeout: float,
    extras: SpanExtras = NO_EXTRAS,
) -> torch.Tensor:
    meta = SpanRequest(span.start, span.end, None if pad_lens is None else tuple(pad_lens), extras.tuning).to_meta()
    message = await _call(p2p, span.peer_id, RPC_FORWARD, [hidden, *extras.tensors], meta, timeout, response_bytes=hidden.nbytes)
    return _single_tensor(message, hidden)


async def call_backward(
    p2p: P2P,
    span: RemoteSpanInfo,
    hidden: torch.Tensor,
    grad_output: torch.Tensor,
    pad_lens: Optional[list[int]],
    *,
    timeout: float,
    extras: SpanExtras = NO_EXTRAS,
) -> list[torch.Tensor]:
    """[d(loss)/d(hidden), then the gradients of extras.grad_like], each checked against its tensor."""
    meta = SpanRequest(span.start, span.end, None if pad_lens is None else tuple(pad_lens), extras.tuning).to_meta()
    response_bytes = hidden.nbytes + sum(t.numel() * 4 for t in extras.grad_like)
    message = await _call(
        p2p, span.peer_id, RPC_BACKWARD, [hidden, grad_output, *extras.tensors], meta, timeout, response_bytes=response_bytes
    )
    likes = [hidden, *extras.grad_like]
    if len(message.tensors) != len(likes):
        raise ProtocolError(f"server answered {len(message.tensors)} gradients, expected {len(likes)}", code=None)
    return [_single_tensor(Message([grad], {}), like) for grad, like in zip(message.tensors, likes)]


def _single_tensor(message: Message, like: torch.Tensor) -> torch.Tensor:
    """The server's answer must be one tensor of the request's shape: a lying server is caught here."""
    if len(message.tensors) != 1 or message.tensors[0].shape != like.shape:
        shapes = [tuple(t.shape) for t in message.tensors]
        raise ProtocolError(f"server answered tensors {shapes}, expected one of shape {tuple(like.shape)}", code=None)
    out = message.tensors[0].to(like.dtype)
    if not all_finite(out):
        raise ProtocolError("server answered NaN or infinity", code=None)
    return out


async def _aiter(items):
    for item in items:
        yield item


class InferenceStream:
    """One open rpc_inference stream to one server: send a step, read its answer.

    Framing is done here on the raw stream (not through hivemind's request iterator) so that a
    server closing the stream is seen at once, and each step costs one write and one read.
    With a mux (client/mux.py, attached once the session is named), steps and their answers travel
    on the client's shared mux stream to that server instead; the open, the probe's answer and the
    close still use this one.
    """

    def __init__(self, p2p: P2P, span: RemoteSpanInfo, wire: Optional[str] = None, mux: Optional[StepMux] = None):
        self.p2p = p2p
        self.span = span
        self.wire = wire  # compression of hidden states sent on this stream (config.WIRE_FORMATS)
        self.mux = mux
        self.session_id: Optional[str] = None  # set by attach(): the session whose steps go on the mux
        self.stepped = False  # the client sent a step on this stream (later ones may take the mux)
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._responses: Optional[AsyncIterator[runtime_pb2.ExpertResponse]] = None
        self.closed = False
        self.messages_sent = 0  # logical messages written to this stream (steps, opens, closes)
        self.bytes_sent = 0  # their tensor bytes as sent (after compression)

    async def open(self, *, timeout: float) -> None:
        peer = PeerID.from_base58(self.span.peer_id)
        _, self._reader, self._writer = await asyncio.wait_for(self.p2p.call_binary_stream_handler(peer, RPC_INFERENCE), timeout)
        self._responses = read_responses(self._reader, self.span.peer_id)

    def attach(self, session_id: str) -> None:
        """This stream's session; with a mux, its answers are read from there from now on."""
        self.session_id = session_id
        if self.mux is not None:
            self.mux.add(session_id)

    async def send_step(self, hidden: torch.Tensor, step: Step) -> None:
        """A step of this stream's session: on the mux if there is one, else on the stream. The first
        step the client sends goes on the stream in any case, right behind the open message: the
        server then runs it on a session it has surely opened (the mux is another stream, with no
        order to this one); its answer, like every later one, comes on the mux."""
        if self.mux is None or not self.stepped:
            self.stepped = True
            try:
                return await self.send([hidden], step.to_meta())
            except ConnectionError:
                if self.mux is None:
                    raise
                # the server may have refused the session and closed this stream: its refusal, which
                # tells the client what to do, comes on the mux
                try:
                    await asyncio.wait_for(self.mux.receive(self.session_id), REFUSAL_WAIT)
                except asyncio.TimeoutError:
                    pass
                raise
        self.messages_sent += 1
        self.bytes_sent += wire_nbytes(hidden, self.wire)
        self.mux.send(step, hidden)

    async def _next_message(self) -> Optional[Message]:
        if self.mux is not None:
            return await self.mux.receive(self.session_id)
        return await read_message(self._responses, max_bytes=MAX_RESPONSE_BYTES)

    async def send(self, tensors: list[torch.Tensor], metadata: dict, *, compress: bool = True) -> None:
        """compress=False: the tensors travel as they are (prompts and adapter weights, not hidden states)."""
        self.messages_sent += 1
        wire = self.wire if compress else None
        for part in pack_message(tensors, metadata, max_part_bytes=DEFAULT_MAX_PART_BYTES, wire=wire):
            self.bytes_sent += sum(len(t.buffer) for t in part.tensors)
            await P2P.send_protobuf(part, self._writer)

    async def read_step(self, position: int, *, timeout: float) -> tuple[StepReply, Message]:
        """The answer to the step at `position`, skipping answers to earlier steps (a step that reached
        the server twice, pushed and relayed, is answered twice)."""

        async def read() -> tuple[StepReply, Message]:
            while True:
                message = await self._next_message()
                if message is None:
                    raise ConnectionError(f"server {self.span.peer_id[-6:]} closed the inference stream")
                try:
                    reply = StepReply.from_meta(message.metadata)
                except ProtocolError as e:
                    raise ProtocolError(f"server answered a malformed step reply: {e.message}", code=None) from None
                if reply.position > position:
                    raise ProtocolError(f"server answered position {reply.position}, expected {position}", code=None)
                if reply.position == position:
                    return reply, message

        async with asyncio.timeout(timeout):  # no extra task per step, unlike asyncio.wait_for
            return await read()

    @staticmethod
    def output(message: Message, like: torch.Tensor) -> torch.Tensor:
        """The step's output tensor, checked against the input's shape."""
        return _single_tensor(message, like)

    async def step(self, hidden: torch.Tensor, step: Step | dict, *, timeout: float) -> torch.Tensor:
        """Send a step and read its answer; raw metadata (e.g. an open message) always goes on this stream."""

        async def exchange() -> Optional[Message]:
            if isinstance(step, Step):
                await self.send_step(hidden, step)
            else:
                await self.send([hidden], step)
            return await self._next_message()

        try:
            async with asyncio.timeout(timeout):
                message = await exchange()
        except ConnectionError as e:  # the write found the stream already closed
            raise ConnectionError(f"server {self.span.peer_id[-6:]} closed the inference stream ({e})") from e
        if message is None:
            raise ConnectionError(f"server {self.span.peer_id[-6:]} closed the inference stream")
        return _single_tensor(message, hidden)

    async def read(self, *, timeout: float) -> Message:
        """The next whole message from the server (e.g. the answer to a probe)."""
        async with asyncio.timeout(timeout):
            message = await read_message(self._responses, max_bytes=MAX_RESPONSE_BYTES)
        if message is None:
            raise ConnectionError(f"server {self.span.peer_id[-6:]} closed the inference stream")
        return message

    def _detach(self) -> None:
        if self.mux is not None and self.session_id is not None:
            self.mux.remove(self.session_id)

    def abort(self) -> None:
        """Close the connection without a close message or end of stream."""
        self.closed = True
        self._detach()
        if self._writer is not None:
            self._writer.close()

    async def close(self, metadata: Optional[dict] = None) -> None:
        if self.closed or self._writer is None:
            return
        self.closed = True
        self._detach()
        try:
            if metadata is not None:
                await self.send([], dict(metadata, close=True))
            await P2P.send_protobuf(P2P.END_OF_STREAM, self._writer)
        except Exception:  # the stream may already be broken; closing it is all that is left
            pass
        finally:
            self._writer.close()
