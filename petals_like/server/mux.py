"""The server's side of rpc_inference_mux: one stream per client carrying many sessions' steps.

A client with several sessions on this server opens one mux stream (wire.MuxHello) and opens each
session on its own rpc_inference stream as before, naming the mux (wire.OpenSession.mux). From
then on the client sends the steps of all those sessions that are ready as one wire.MuxSteps
message, and every answer of those sessions travels back on the mux: to steps sent there, to
steps pushed by the previous server, to replays sent on the session's own stream, and the error
that ends a session. The answers that one iteration finishes leave as one wire.MuxReplies message.

Isolation is as with separate streams: a mux step reaches only a session that its own peer opened
on this mux (else that step alone is answered with an error), each step is queued to its session's
own inbox and runs through the same checks (positions, limits, pages) in handler.rpc_inference, and
an error ends only the session it belongs to. The session stays open until its own stream closes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Optional

import torch
from hivemind.proto import runtime_pb2

from petals_like.protocol import ErrorCode, ProtocolError, pack_message
from petals_like.utils.turns import settle
from petals_like.wire import MuxReplies, MuxReply, StepReply

logger = logging.getLogger(__name__)

MAX_MUXES_PER_PEER = 4  # a client needs one per wire format it uses; more only cost the server streams


class ServerMux:
    """One client's mux stream: routes its steps into sessions' inboxes, gathers their answers."""

    def __init__(self, mux_id: str, peer_id: str, wire: Optional[str], max_part_bytes: int):
        self.mux_id, self.peer_id, self.wire = mux_id, peer_id, wire
        self.max_part_bytes = max_part_bytes
        self.sessions: dict[str, Any] = {}  # id -> ServerSession opened naming this mux, until it closes
        self._ready: list[tuple[MuxReply, Optional[torch.Tensor]]] = []
        self._wake = asyncio.Event()
        self.closed = False

    def answer(self, session_id: str, reply: StepReply, output: torch.Tensor) -> None:
        self._post(MuxReply(session_id, reply), output)

    def fail(self, session_id: str, error: BaseException) -> None:
        """The session's error, as its own stream would have carried it (ErrorCode in the text)."""
        self._post(MuxReply(session_id, error=str(error) or repr(error)), None)

    def _post(self, reply: MuxReply, output: Optional[torch.Tensor]) -> None:
        if self.closed:
            return  # the client is gone; its sessions end as their own streams close
        self._ready.append((reply, output))
        self._wake.set()

    def close(self) -> None:
        """The client's side ended: answers from now on are dropped, and outgoing() ends."""
        self.closed = True
        self._wake.set()

    async def outgoing(self) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """The stream's answer parts, message by message, until the mux closes."""
        while True:
            await self._wake.wait()
            if self.closed:
                return
            await settle(lambda: len(self._ready))  # the other answers of the same iteration
            ready, self._ready = self._ready, []
            self._wake.clear()
            replies = MuxReplies(tuple(reply for reply, _ in ready))
            tensors = [out for _, out in ready if out is not None]
            for part in pack_message(
                tensors,
                replies.to_meta(),
                proto=runtime_pb2.ExpertResponse,
                max_part_bytes=self.max_part_bytes,
                wire=self.wire,
            ):
                yield part


def unknown_session(session_id: str) -> ProtocolError:
    """Not the caller's bug for certain (the session may have ended here, or the server moved to other
    blocks): the client replays it elsewhere, as for a session this server lost."""
    return ProtocolError(f"session {session_id!r} was not opened on this mux stream by this peer", ErrorCode.OUT_OF_SYNC)
