"""The client's side of rpc_inference_mux (server/mux.py): one stream per server for all sessions there.

Concurrent generate() calls of one process run as coroutines on the node's loop, and the steps of a
round leave within a few loop turns of each other (their LM head rows are computed in one pass).
Without a mux, each session writes its own message on its own stream to each server and reads its
own answer; with one, the steps that become ready together travel as one MuxSteps message per
server and their answers come back as one MuxReplies message (the server gathers the answers one
iteration finishes, also those to pushed steps). Each session still has its own rpc_inference
stream: it opens the session (tuning tensors, prefix probe), closes it, and its end frees the
session's cache on the server.

StepMuxes keeps one StepMux per (server, wire format) for a client; a server without the mux
handler (an older version) is remembered and its sessions use their own streams.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import AsyncIterator, Optional

import torch
from hivemind.p2p import P2P, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from petals_like.config import DEFAULT_MAX_PART_BYTES
from petals_like.protocol import RPC_INFERENCE_MUX, Message, ProtocolError, pack_message, read_message
from petals_like.utils.turns import settle
from petals_like.wire import MuxHello, MuxReplies, MuxSteps, Step

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 1 << 31  # what a client reads from a server in one message


async def read_responses(reader: asyncio.StreamReader, peer_id: str) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """A server's answer parts on a raw stream, until it closes it; its error raised as P2PHandlerError."""
    while True:
        try:
            response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
        except asyncio.IncompleteReadError:  # the server closed the stream
            return
        if error is not None:
            raise P2PHandlerError(f"server {peer_id[-6:]} answered: {error.message}")
        yield response


class StepMux:
    """One open mux stream to one server: queues steps of many sessions into one message, and hands
    each session the answers addressed to it, in order."""

    def __init__(self, p2p: P2P, peer_id: str, wire: Optional[str]):
        self.p2p, self.peer_id, self.wire = p2p, peer_id, wire
        self.mux_id = uuid.uuid4().hex
        self.broken: Optional[BaseException] = None  # why the stream ended; every later read raises it
        self._answers: dict[str, asyncio.Queue] = {}  # session id -> its answers (Message or exception)
        self._outbox: list[tuple[Step, torch.Tensor]] = []
        self._sender: Optional[asyncio.Task] = None
        self._writing = asyncio.Lock()  # a message's parts go out together, also when a flush overlaps the last
        self._reader_task: Optional[asyncio.Task] = None
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self.messages_sent = 0  # MuxSteps messages written
        self.steps_sent = 0  # steps they carried
        self.messages_received = 0  # MuxReplies messages read (the open's answer not counted)

    async def open(self, *, timeout: float) -> None:
        """Open the stream and wait for the server's empty answer: from then on sessions can name it."""
        peer = PeerID.from_base58(self.peer_id)

        async def handshake() -> None:
            _, self._reader, self._writer = await self.p2p.call_binary_stream_handler(peer, RPC_INFERENCE_MUX)
            for part in pack_message([], MuxHello(self.mux_id, self.wire).to_meta()):
                await P2P.send_protobuf(part, self._writer)
            first = await read_message(read_responses(self._reader, self.peer_id), max_bytes=MAX_RESPONSE_BYTES)
            if first is None or MuxReplies.from_meta(first.metadata, len(first.tensors)).replies:
                raise ProtocolError("the server did not open the mux stream", code=None)

        try:
            await asyncio.wait_for(handshake(), timeout)
        except BaseException:
            self.abort()
            raise
        self._reader_task = asyncio.create_task(self._read())

    def add(self, session_id: str) -> None:
        self._answers[session_id] = asyncio.Queue()

    def remove(self, session_id: str) -> None:
        self._answers.pop(session_id, None)

    def send(self, step: Step, hidden: torch.Tensor) -> None:
        """Queue a session's step; it leaves with the other steps queued within a few loop turns."""
        if self.broken is not None:
            raise ConnectionError(f"mux stream to {self.peer_id[-6:]} is closed: {self.broken!r}")
        self._outbox.append((step, hidden))
        if self._sender is None:
            self._sender = asyncio.create_task(self._flush())

    async def receive(self, session_id: str) -> Message:
        """The next answer to this session: a step's output (StepReply metadata), or its error raised."""
        queue = self._answers.get(session_id)
        if queue is None:
            raise ConnectionError(f"session {session_id} is not on the mux stream to {self.peer_id[-6:]}")
        if queue.empty() and self.broken is not None:
            raise ConnectionError(f"mux stream to {self.peer_id[-6:]} closed: {self.broken!r}")
        item = await queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self) -> None:
        self._fail(ConnectionError("mux stream aborted"))
        if self._writer is not None:
            self._writer.close()
        for task in (self._sender, self._reader_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    # ---- internals ----

    async def _flush(self) -> None:
        try:
            await settle(lambda: len(self._outbox))  # the other sessions' steps of this round
        finally:
            self._sender = None
        batch, self._outbox = self._outbox, []
        try:
            parts = pack_message(
                [hidden for _, hidden in batch],
                MuxSteps(tuple(step for step, _ in batch)).to_meta(),
                max_part_bytes=DEFAULT_MAX_PART_BYTES,
                wire=self.wire,
            )
            async with self._writing:
                for part in parts:
                    await P2P.send_protobuf(part, self._writer)
            self.messages_sent += 1
            self.steps_sent += len(batch)
        except Exception as e:  # the stream broke: every session on it hears of it
            self._fail(ConnectionError(f"writing to the mux stream to {self.peer_id[-6:]} failed: {e!r}"))

    async def _read(self) -> None:
        responses = read_responses(self._reader, self.peer_id)
        try:
            while True:
                message = await read_message(responses, max_bytes=MAX_RESPONSE_BYTES)
                if message is None:
                    raise ConnectionError(f"server {self.peer_id[-6:]} closed the mux stream")
                replies = MuxReplies.from_meta(message.metadata, len(message.tensors)).replies
                self.messages_received += 1
                tensors = iter(message.tensors)
                for reply in replies:
                    queue = self._answers.get(reply.session_id)
                    if reply.error is not None:
                        item = P2PHandlerError(f"server {self.peer_id[-6:]} answered: {reply.error}")
                    else:
                        item = Message([next(tensors)], reply.reply.to_meta())
                    if queue is not None:  # else: a session closed since
                        queue.put_nowait(item)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        if self.broken is None:
            self.broken = error
        for queue in self._answers.values():
            queue.put_nowait(error)


class StepMuxes:
    """A client's mux streams, one per (server, wire format), opened on first use."""

    def __init__(self, p2p_of, *, enabled: bool = True):
        self._p2p_of = p2p_of  # () -> the node's P2P (it exists only once the node started)
        self.enabled = enabled
        self._muxes: dict[tuple[str, Optional[str]], StepMux] = {}
        self._opening: dict[tuple[str, Optional[str]], asyncio.Future] = {}
        self._unsupported: set[str] = set()  # servers a mux could not be opened to

    async def get(self, peer_id: str, wire: Optional[str], *, timeout: float) -> Optional[StepMux]:
        """The open mux to this server (opened now if needed), or None where it cannot have one."""
        if not self.enabled or peer_id in self._unsupported:
            return None
        key = (peer_id, wire)
        mux = self._muxes.get(key)
        if mux is not None and mux.broken is None:
            return mux
        pending = self._opening.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future = self._opening[key] = asyncio.get_running_loop().create_future()
        mux = StepMux(self._p2p_of(), peer_id, wire)
        try:
            await mux.open(timeout=timeout)
        except Exception as e:
            # a server without the handler (an older version), or one that is failing: its sessions
            # use their own streams from now on (a failing server also fails their opens, which the
            # session handles as any failure)
            self._unsupported.add(peer_id)
            logger.debug(f"No mux stream to {peer_id[-6:]}: {e!r}")
            mux = None
        else:
            self._muxes[key] = mux
        finally:
            self._opening.pop(key, None)
        future.set_result(mux)
        return mux

    def counters(self) -> dict[str, tuple[int, int, int]]:
        """peer id -> (mux messages sent, steps they carried, answer messages read), over the open muxes."""
        totals: dict[str, tuple[int, int, int]] = {}
        for (peer, _), mux in self._muxes.items():
            counts = (mux.messages_sent, mux.steps_sent, mux.messages_received)
            totals[peer] = tuple(a + b for a, b in zip(totals.get(peer, (0, 0, 0)), counts))
        return totals
