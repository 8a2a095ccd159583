"""The push batcher alone, with a stand-in for the P2P node: what travels in one message, and what a
lost or partial answer means for each push."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from petals_like.protocol import RPC_PUSH, encode_metadata, unpack_message, wire_nbytes
from petals_like.server.push import PushBatcher
from petals_like.wire import MAX_PUSH_BATCH, PushBatch, PushedStep, PushReply, Step

PEERS = [
    PeerID.from_base58(p)
    for p in ("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmZMxNdpMkewiVZLMRxaNxUeZpDUb34pWjZ1kZvsd16Zic")
]


class FakeP2P:
    """Answers rpc_push by accepting every push (or what `answer` says); records each message."""

    def __init__(self, answer=None):
        self.messages: list[tuple[PeerID, PushBatch]] = []
        self.answer = answer

    async def call_protobuf_handler(self, peer, name, request, response_type):
        assert name == RPC_PUSH and response_type is runtime_pb2.ExpertResponse
        message = unpack_message(request, max_bytes=1 << 30)
        batch = PushBatch.from_meta(message.metadata, len(message.tensors))
        assert None not in batch.pushes, "a push the next server would refuse as malformed"
        assert all(torch.equal(t, torch.full_like(t, float(p.step.position))) for t, p in zip(message.tensors, batch.pushes))
        self.messages.append((peer, batch))
        accepted = self.answer(batch) if self.answer else [True] * len(batch.pushes)
        return runtime_pb2.ExpertResponse(metadata=encode_metadata(PushReply(tuple(accepted)).to_meta()))


def pushed(i: int) -> PushedStep:
    return PushedStep(Step(f"session-{i}", position=i), token=f"token-{i}-" + "x" * 32)  # tokens are long


def run_pushes(p2p: FakeP2P, items: list[tuple[PeerID, int, tuple[int, ...]]], max_part_bytes: int = 1 << 20) -> list[bool]:
    """Push every (peer, i, shape) at once, as the steps of one iteration do: push i carries a tensor of
    that shape filled with i. Returns what each push() said."""

    async def main():
        batcher = PushBatcher(p2p, SimpleNamespace(max_part_bytes=max_part_bytes, push_timeout=5.0))
        results = await asyncio.gather(
            *(batcher.push(peer, pushed(i), torch.full(shape, float(i)), None) for peer, i, shape in items)
        )
        return results, batcher

    results, batcher = asyncio.run(main())
    assert batcher.pushes_sent == sum(results)
    return results


def test_pushes_queued_together_travel_in_one_message_per_next_server():
    p2p = FakeP2P()
    items = [(PEERS[i % 2], i, (1, 1, 8)) for i in range(6)]
    assert run_pushes(p2p, items) == [True] * 6
    assert sorted(str(peer) for peer, _ in p2p.messages) == sorted(str(p) for p in PEERS)
    for peer, batch in p2p.messages:
        assert [p.step.session_id for p in batch.pushes] == [f"session-{i}" for i in range(6) if PEERS[i % 2] == peer]
        assert [p.token for p in batch.pushes] == [f"token-{i}-" + "x" * 32 for i in range(6) if PEERS[i % 2] == peer]


def test_a_batch_splits_by_message_size_and_count():
    tensor = (1, 1, 64)
    per_push = wire_nbytes(torch.zeros(tensor))
    p2p = FakeP2P()
    assert run_pushes(p2p, [(PEERS[0], i, tensor) for i in range(5)], max_part_bytes=2 * per_push + 1) == [True] * 5
    assert [len(batch.pushes) for _, batch in p2p.messages] == [2, 2, 1]

    p2p = FakeP2P()
    count = MAX_PUSH_BATCH + 3
    assert all(run_pushes(p2p, [(PEERS[0], i, (1, 1, 2)) for i in range(count)]))
    assert sorted(len(batch.pushes) for _, batch in p2p.messages) == [3, MAX_PUSH_BATCH]


def test_each_push_gets_its_own_answer_and_a_lost_message_means_relay():
    p2p = FakeP2P(answer=lambda batch: [p.step.position % 2 == 0 for p in batch.pushes])
    assert run_pushes(p2p, [(PEERS[0], i, (1, 1, 4)) for i in range(4)]) == [True, False, True, False]

    # an answer of the wrong length, or no answer at all: every client of the batch relays
    assert run_pushes(FakeP2P(answer=lambda batch: [True]), [(PEERS[0], i, (1, 1, 4)) for i in range(3)]) == [False] * 3

    def fail(batch):
        raise ConnectionError("gone")

    assert run_pushes(FakeP2P(answer=fail), [(PEERS[0], 0, (1, 1, 4))]) == [False]


def test_a_push_larger_than_one_message_is_left_to_the_client():
    p2p = FakeP2P()
    assert run_pushes(p2p, [(PEERS[0], 0, (1, 100, 64))], max_part_bytes=1000) == [False]
    assert p2p.messages == []
