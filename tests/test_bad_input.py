"""Every RPC answers bad input with a clear error, and the same server then serves good requests."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hivemind.p2p import P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from petals_like.client.transport import InferenceStream
from petals_like.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from petals_like.dht.node import SwarmNode
from petals_like.protocol import RPC_BACKWARD, RPC_FORWARD, RPC_INFERENCE, encode_metadata, pack_message
from petals_like.wire import call_info
from tests.swarm import HIDDEN, Swarm, assert_still_serves, forward, start_swarm, wait_until


@pytest.fixture(scope="module")
def swarm(tiny_model: Path) -> Iterator[Swarm]:
    swarm = start_swarm(tiny_model, ["2:6"], max_session_length=32)
    try:
        yield swarm
    finally:
        swarm.shutdown()


@pytest.fixture(scope="module")
def client(swarm: Swarm) -> Iterator[SwarmNode]:
    node = SwarmNode(swarm.peers, client_mode=True, name="test-client")
    yield node
    node.shutdown()


@pytest.fixture(scope="module")
def span(swarm: Swarm) -> RemoteSpanInfo:
    server = swarm.servers[0]
    return RemoteSpanInfo(server.node.peer_id, 2, 6, ServerInfo(ServerState.ONLINE, 2, 6))


def raw_call(client: SwarmNode, span: RemoteSpanInfo, name: str, request: runtime_pb2.ExpertRequest):
    coro = client.p2p.call_protobuf_handler(PeerID.from_base58(span.peer_id), name, request, runtime_pb2.ExpertResponse)
    return client.run(asyncio.wait_for(coro, 30))


BAD_FORWARDS = {
    "wrong hidden size": (torch.randn(1, 3, HIDDEN + 1), {}, "hidden size"),
    "wrong dtype": (torch.randint(0, 5, (1, 3, HIDDEN)), {}, "must be one of"),
    "wrong rank": (torch.randn(3, HIDDEN), {}, "[batch, seq, hidden]"),
    "nan": (torch.full((1, 3, HIDDEN), float("nan")), {}, "NaN"),
    "block range outside span": (torch.randn(1, 3, HIDDEN), {"start": 0, "end": 4}, "not inside"),
    "empty block range": (torch.randn(1, 3, HIDDEN), {"start": 4, "end": 4}, "not inside"),
    "non-integer start": (torch.randn(1, 3, HIDDEN), {"start": "2", "end": 6}, "integer"),
    "bad pad_lens": (torch.randn(2, 3, HIDDEN), {"pad_lens": [0, 7]}, "pad_lens"),
    "too many tokens": (torch.randn(1, 20000, HIDDEN), {}, "per request"),
}


@pytest.mark.parametrize("case", list(BAD_FORWARDS), ids=list(BAD_FORWARDS))
def test_forward_rejects_bad_input(client, span, case):
    tensor, meta, expected = BAD_FORWARDS[case]
    metadata = {"start": 2, "end": 6, **meta}
    parts = pack_message([tensor], metadata)
    if len(parts) == 1:
        with pytest.raises(P2PHandlerError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            raw_call(client, span, RPC_FORWARD, parts[0])
    else:
        with pytest.raises(Exception):
            forward(client, span, tensor)
    assert_still_serves(client, span)


def test_backward_rejects_mismatched_grad(client, span):
    parts = pack_message([torch.randn(1, 3, HIDDEN), torch.randn(1, 4, HIDDEN)], {"start": 2, "end": 6})
    with pytest.raises(P2PHandlerError, match="grad_outputs"):
        raw_call(client, span, RPC_BACKWARD, parts[0])
    assert_still_serves(client, span)


@pytest.mark.parametrize(
    "payload",
    [
        runtime_pb2.ExpertRequest(metadata=b"\xff\x00garbage"),
        runtime_pb2.ExpertRequest(
            metadata=encode_metadata({"start": 2, "end": 6}),
            tensors=[runtime_pb2.Tensor(buffer=b"xyz", size=[1, 3, HIDDEN], dtype="float32")],
        ),
        runtime_pb2.ExpertRequest(
            metadata=encode_metadata({"start": 2, "end": 6}),
            tensors=[runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[2], dtype="object")],
        ),
        runtime_pb2.ExpertRequest(metadata=encode_metadata([1, 2, 3])),
    ],
    ids=["garbage-metadata", "short-buffer", "object-dtype", "metadata-not-a-map"],
)
def test_forward_rejects_garbage(client, span, payload):
    with pytest.raises(P2PHandlerError):
        raw_call(client, span, RPC_FORWARD, payload)
    assert_still_serves(client, span)


def test_garbage_bytes_on_the_wire(client, span):
    """Bytes that are not a protobuf at all, on the unary and on the stream protocol."""

    async def send_garbage():
        peer = PeerID.from_base58(span.peer_id)
        with pytest.raises((P2PHandlerError, P2PDaemonError, asyncio.IncompleteReadError, ConnectionError, Exception)):
            await client.p2p._client.call_unary_handler(peer, RPC_FORWARD, b"\x08\x96\x01garbage\xff\xff")
        _, reader, writer = await client.p2p.call_binary_stream_handler(peer, RPC_INFERENCE)
        writer.write(b"\x07not a protobuf message at all")
        await writer.drain()
        writer.close()

    client.run(send_garbage(), timeout=30)
    assert_still_serves(client, span)


def inference(client: SwarmNode, span: RemoteSpanInfo, steps: list[tuple[list[torch.Tensor], dict]]) -> list[torch.Tensor]:
    async def run():
        stream = InferenceStream(client.p2p, span)
        await stream.open(timeout=30)
        outputs = []
        try:
            for tensors, meta in steps:
                if tensors:
                    outputs.append(await stream.step(tensors[0], meta, timeout=30))
                else:
                    await stream.send([], meta)
        finally:
            await stream.close()
        return outputs

    return client.run(run(), timeout=60)


def open_meta(session_id: str, **overrides) -> dict:
    return {"session_id": session_id, "start": 2, "end": 6, "max_length": 8, "batch_size": 1, **overrides}


@pytest.mark.parametrize(
    "meta, step, expected",
    [
        (dict(max_length=10**9), torch.randn(1, 1, HIDDEN), "max_length"),
        (dict(max_length=0), torch.randn(1, 1, HIDDEN), "max_length"),
        (dict(start=0), torch.randn(1, 1, HIDDEN), "not inside"),
        (dict(batch_size=2), torch.randn(1, 1, HIDDEN), "batch size"),
        ({}, torch.randn(1, 9, HIDDEN), "max_length"),
        ({}, torch.randn(1, 2, HIDDEN + 3), "hidden size"),
        ({}, torch.randn(1, 2, HIDDEN).half(), None),
        ({}, torch.full((1, 2, HIDDEN), float("inf")), "NaN or infinity"),
    ],
    ids=[
        "huge-max-length",
        "zero-max-length",
        "outside-span",
        "batch-mismatch",
        "past-max-length",
        "wrong-hidden",
        "float16-ok",
        "infinite",
    ],
)
def test_inference_rejects_bad_steps(client, span, meta, step, expected):
    sid = uuid.uuid4().hex
    if expected is None:
        (out,) = inference(client, span, [([step], open_meta(sid, **meta))])
        assert out.dtype == torch.float16 and out.shape == step.shape
    else:
        with pytest.raises(P2PHandlerError, match=expected):
            inference(client, span, [([step], open_meta(sid, **meta))])
    assert_still_serves(client, span)


def test_inference_unknown_and_closed_sessions(client, span):
    sid = uuid.uuid4().hex
    with pytest.raises(P2PHandlerError, match="unknown session"):
        inference(client, span, [([], open_meta(sid)), ([torch.randn(1, 1, HIDDEN)], {"session_id": "not-" + sid})])
    with pytest.raises(P2PHandlerError, match="session_id"):
        inference(client, span, [([torch.randn(1, 1, HIDDEN)], {"start": 2, "end": 6, "max_length": 8})])
    # a closed session ends its stream: the client sees the end instead of an answer
    with pytest.raises(ConnectionError, match="closed the inference stream"):
        inference(
            client,
            span,
            [([], open_meta(sid)), ([], {"session_id": sid, "close": True}), ([torch.randn(1, 1, HIDDEN)], {"session_id": sid})],
        )
    assert_still_serves(client, span)


def test_inference_and_info_after_errors(client, span, swarm):
    """A good session on the same server works, and its cache is freed when it ends."""
    sid = uuid.uuid4().hex
    steps = [([torch.randn(1, 3, HIDDEN)], open_meta(sid))] + [([torch.randn(1, 1, HIDDEN)], {"session_id": sid})] * 4
    outputs = inference(client, span, steps)
    assert [o.shape[1] for o in outputs] == [3, 1, 1, 1, 1]
    sessions = swarm.servers[0].sessions
    total = sessions.pool.num_pages * sessions.pool.page_size

    def info() -> dict:
        return client.run(call_info(client.p2p, span.peer_id, timeout=10))

    assert info().announced["start_block"] == 2 and info().announced["end_block"] == 6
    # streams end asynchronously after the client closes them; then every page is back
    wait_until(lambda: info().cache_tokens_left == total and not sessions.sessions, 10)
