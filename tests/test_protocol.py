"""Message framing and tensor decoding, without a network."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2

from petals_like.protocol import (
    ProtocolError,
    decode_tensors,
    pack_message,
    prefix_page_hashes,
    read_message,
    unpack_message,
)


async def _aiter(items):
    for item in items:
        yield item


def read_all(parts, max_bytes=1 << 30):
    return asyncio.run(read_message(_aiter(parts), max_bytes=max_bytes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_round_trip_in_many_parts(dtype):
    tensors = [torch.randn(3, 50, 7).to(dtype), torch.arange(5), torch.randn(2, 0, 4).to(dtype)]
    parts = pack_message(tensors, {"step": 3, "name": "x"}, max_part_bytes=256)
    assert len(parts) > 4
    message = read_all(parts)
    assert message.metadata == {"step": 3, "name": "x"}
    assert [t.dtype for t in message.tensors] == [t.dtype for t in tensors]
    for got, sent in zip(message.tensors, tensors):
        assert torch.equal(got, sent)


def test_single_part_unary():
    parts = pack_message([torch.ones(2, 3)], {"a": 1})
    assert len(parts) == 1
    assert torch.equal(unpack_message(parts[0], max_bytes=1000).tensors[0], torch.ones(2, 3))
    with pytest.raises(ProtocolError, match="limit"):
        unpack_message(parts[0], max_bytes=10)


def test_truncated_and_oversized_streams_are_rejected():
    parts = pack_message([torch.randn(1000)], {}, max_part_bytes=512)
    with pytest.raises(ProtocolError, match="stream ended"):
        read_all(parts[:-1])
    with pytest.raises(ProtocolError, match="limit"):
        read_all(parts, max_bytes=1000)
    assert read_all([]) is None


def test_inconsistent_tensor_headers_are_rejected():
    with pytest.raises(ProtocolError, match="needs"):
        decode_tensors([runtime_pb2.Tensor(buffer=b"\x00" * 7, size=[2], dtype="float32")])
    with pytest.raises(ProtocolError, match="dtype"):
        decode_tensors([runtime_pb2.Tensor(buffer=b"\x00" * 8, size=[1], dtype="complex64")])
    with pytest.raises(ProtocolError, match="without a header"):
        decode_tensors([runtime_pb2.Tensor(buffer=b"\x00" * 8)])
    with pytest.raises(ProtocolError, match="chunks"):
        decode_tensors([runtime_pb2.Tensor(buffer=b"\x00" * 4, size=[2], dtype="float32", chunks=2)])


def test_prefix_page_hashes_are_chained_and_salted():
    tokens = list(range(3 * 16 + 2))
    hashes = prefix_page_hashes(tokens, "model")
    assert len(hashes) == 3  # the partial last page has none
    changed = list(tokens)
    changed[16 + 1] += 1  # the second page differs: its hash and every later one change
    other = prefix_page_hashes(changed, "model")
    assert other[0] == hashes[0] and other[1] != hashes[1] and other[2] != hashes[2]
    assert prefix_page_hashes(tokens, "another adapter")[0] != hashes[0]
    # continuing from a parent gives the same chain as hashing everything at once
    assert prefix_page_hashes(tokens, "model", start_page=1, parent=hashes[0]) == hashes[1:]
    assert prefix_page_hashes(tokens, "model", page_tokens=4)[:1] != hashes[:1]


def test_int8_wire_round_trip_and_a_tag_of_its_own():
    """The "int8" wire format: blocks of 64 values with one float16 scale each, so every value is within
    half a step (absmax / 127 / 2) of its original, plus the float16 rounding of the scale (<= 127 x
    2**-11 steps). Its compression tag is none of hivemind's: a
    hivemind peer refuses the tensor instead of reading it as its own BLOCKWISE_8BIT layout."""
    from hivemind.compression import deserialize_torch_tensor

    from petals_like.protocol import WIRE_BLOCK, WIRE_INT8_TAG

    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 16)
    (part,) = pack_message([x], {}, wire="int8")
    (chunk,) = part.tensors
    assert chunk.compression == WIRE_INT8_TAG and WIRE_INT8_TAG not in runtime_pb2.CompressionType.values()
    (y,) = unpack_message(part, max_bytes=1 << 20).tensors
    assert y.shape == x.shape and y.dtype == x.dtype
    blocks = torch.nn.functional.pad(x.reshape(-1), (0, -x.numel() % WIRE_BLOCK)).reshape(-1, WIRE_BLOCK)
    half_step = (blocks.abs().amax(dim=1, keepdim=True) / 127 / 2).expand_as(blocks).reshape(-1)[: x.numel()]
    assert torch.all((y - x).abs().reshape(-1) <= half_step * (1 + 2 * 127 * 2**-11) + 1e-6)
    with pytest.raises(Exception):
        deserialize_torch_tensor(chunk)
