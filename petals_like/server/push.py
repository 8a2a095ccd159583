"""Server-to-server push, batched per next server.

One batched iteration finishes the steps of many sessions at once, and sessions that share a chain
push their outputs to the same next server. Each such group travels as one rpc_push message: a
wire.PushBatch (each push's Step and push token) with the output of each push as its tensors, in
the same order; the next server answers a wire.PushReply (accepted or not, per push). One message instead of one call
per session saves a stream, a round trip and the event-loop work of each; a push refused or lost
is answered false and that client relays the output itself, as before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from petals_like.config import ServerConfig
from petals_like.protocol import RPC_PUSH, decode_metadata, pack_message, wire_nbytes
from petals_like.utils.turns import settle
from petals_like.wire import MAX_PUSH_BATCH, PushBatch, PushedStep, PushReply

logger = logging.getLogger(__name__)


class PushBatcher:
    def __init__(self, p2p: P2P, config: ServerConfig):
        self.p2p = p2p
        self.config = config  # max_part_bytes, push_timeout
        self._queues: dict[tuple[str, Optional[str]], list] = {}  # (peer, wire) -> [(push, tensor, future)]
        self._senders: set[asyncio.Task] = set()
        # learns how to reach a next server not met yet (directly or through its relays; dht/relay.py)
        self.resolve: Optional[Callable[[str], Awaitable[None]]] = None
        self.messages_sent = 0
        self.pushes_sent = 0

    async def push(self, peer: PeerID, push: PushedStep, tensor: torch.Tensor, wire: Optional[str]) -> bool:
        """Queue one push; True once the next server took it, False if the client must relay it."""
        if wire_nbytes(tensor, wire) > self.config.max_part_bytes:
            return False  # prompts too large for one message (in the session's wire format) go through the client
        key = (peer.to_base58(), wire)
        future = asyncio.get_running_loop().create_future()
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = []
            sender = asyncio.create_task(self._send(peer, key))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        queue.append((push, tensor, future))
        return await future

    async def _send(self, peer: PeerID, key: tuple[str, Optional[str]]) -> None:
        try:
            await settle(lambda: len(self._queues[key]))
        except asyncio.CancelledError:  # shutting down: every client relays
            for _, _, future in self._queues.pop(key):
                future.set_result(False)
            raise
        if self.resolve is not None:
            try:
                await asyncio.wait_for(self.resolve(key[0]), self.config.push_timeout / 2)
            except Exception as e:  # pushing may still work (or the clients relay)
                logger.debug(f"Could not look up how to reach {key[0]}: {e!r}")
        items = self._queues.pop(key)
        batches, batch, nbytes = [], [], 0
        for item in items:
            size = wire_nbytes(item[1], key[1])
            if batch and (nbytes + size > self.config.max_part_bytes or len(batch) == MAX_PUSH_BATCH):
                batches.append(batch)
                batch, nbytes = [], 0
            batch.append(item)
            nbytes += size
        batches.append(batch)
        await asyncio.gather(*(self._send_batch(peer, batch, key[1]) for batch in batches))

    async def _send_batch(self, peer: PeerID, batch: list, wire: Optional[str]) -> None:
        accepted: list = []
        try:
            parts = pack_message(
                [tensor for _, tensor, _ in batch],
                PushBatch(tuple(push for push, _, _ in batch)).to_meta(),
                max_part_bytes=self.config.max_part_bytes,
                wire=wire,
            )
            if len(parts) == 1:
                response = await asyncio.wait_for(
                    self.p2p.call_protobuf_handler(peer, RPC_PUSH, parts[0], runtime_pb2.ExpertResponse), self.config.push_timeout
                )
                accepted = list(PushReply.from_meta(decode_metadata(response.metadata)).accepted)
                self.messages_sent += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:  # every client of the batch relays its output itself
            logger.debug(f"Push to {peer} failed: {e!r}")
        finally:
            if len(accepted) != len(batch):
                accepted = [False] * len(batch)
            for (_, _, future), ok in zip(batch, accepted):
                if not future.done():
                    future.set_result(ok is True)
            self.pushes_sent += sum(ok is True for ok in accepted)
