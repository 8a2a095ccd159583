"""The wire: RPC names, message framing in parts, tensor and metadata encoding.

A logical message is a list of tensors plus a metadata dict. It travels as one or more protobuf
parts (hivemind's ExpertRequest / ExpertResponse), each below the P2P message limit: big tensors
are cut into chunks, small ones share a part. The first part's metadata says how many parts follow.
Everything read from the wire is validated here before any other code sees it.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Optional, Sequence, Type, TypeVar, Union

import msgpack
import numpy as np
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PHandlerError
from hivemind.proto import runtime_pb2

from petals_like.config import DEFAULT_MAX_PART_BYTES

RPC_INFO = "petals_like.rpc_info"
RPC_FORWARD = "petals_like.rpc_forward"
RPC_BACKWARD = "petals_like.rpc_backward"
RPC_INFERENCE = "petals_like.rpc_inference"
RPC_INFERENCE_MUX = "petals_like.rpc_inference_mux"  # one stream per client and server: many sessions' steps
RPC_PUSH = "petals_like.rpc_push"  # server -> next server: steps' outputs as the next span's inputs

PROTOCOL_VERSION = 5  # 2: rpc_push carries a list of steps (server/push.py); 3: refusals carry an ErrorCode;
# 4: the 8-bit wire format has its own compression tag (WIRE_INT8_TAG); 5: rpc_inference_mux
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIRE_BLOCK = 64  # values per float16 scale in the "int8" wire format (config.WIRE_FORMATS)
# the Tensor.compression value of that format: none of hivemind's CompressionType values (0-5), since
# hivemind's BLOCKWISE_8BIT is another byte layout (a bitsandbytes codebook over blocks of 4096); a
# hivemind peer refuses this tag instead of decoding garbage
WIRE_INT8_TAG = 64
_TENSOR_DTYPES = {**WIRE_DTYPES, "int64": torch.int64, "int32": torch.int32}
# numpy dtype with the same bytes (bfloat16 has none: it travels as int16 bits); numpy does the
# byte work because each torch op costs ~10-20 us of dispatch on a small CPU, numpy ~1 us
_NUMPY_VIEWS = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "int64": np.int64, "int32": np.int32}
_ITEMSIZE = {name: np.dtype(view).itemsize for name, view in _NUMPY_VIEWS.items()}
_FLOAT_BITS = {
    torch.float32: (torch.int32, 0x7F800000),
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
}


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity: all-ones exponent bits, checked with numpy on CPU tensors."""
    bits = _FLOAT_BITS.get(tensor.dtype)
    if bits is None or tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    int_dtype, mask = bits
    values = tensor.detach().contiguous().view(int_dtype).numpy()
    return not np.any((values & mask) == mask)


_PARTS_KEY = "_parts"
MAX_PARTS = 1 << 16
MAX_METADATA_BYTES = 1 << 20

Proto = TypeVar("Proto", runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse)


class ErrorCode(str, enum.Enum):
    """Why a server refused a request; it travels in the refusal's text (see ProtocolError) and the
    client acts on it (client/transport.py: callers_fault), never on the wording."""

    BAD_REQUEST = "bad_request"  # malformed or contradictory: any server would refuse it; the caller's bug
    SERVER_LIMIT = "server_limit"  # beyond this server's limits or span: another server may take it
    CACHE_FULL = "cache_full"  # no KV cache pages free in time: retriable, later or elsewhere
    ADAPTER_NOT_CACHED = "adapter_not_cached"  # the server dropped the client's LoRA weights: send them again
    OUT_OF_SYNC = "out_of_sync"  # the server's state of the session does not match the step: replay elsewhere


class ProtocolError(ValueError):
    """The peer sent something this protocol cannot accept; the message says what, the code why.

    str() starts with "[code] ": hivemind sends an error to the caller as its text, so the code
    travels inside it (read back by refusal_code). code=None for the client's checks of answers."""

    def __init__(self, message: str, code: Optional[ErrorCode] = ErrorCode.BAD_REQUEST):
        super().__init__(message)
        self.message, self.code = message, code

    def __str__(self) -> str:
        return self.message if self.code is None else f"[{self.code.value}] {self.message}"

    def __repr__(self) -> str:
        return f"ProtocolError({str(self)!r})"


# a refusal as the caller sees it: "ProtocolError('[code] ...')" from a unary call (hivemind sends repr),
# "[code] ..." from a stream (hivemind sends str), after "server X answered: " (client/transport.py)
_REFUSAL = re.compile(r"^(?:ProtocolError\((?:'|\")|server \S+ answered: )?\[(?P<code>[a-z_]+)\] ")


def refusal_code(error: BaseException) -> Optional[ErrorCode]:
    """The code of a server's refusal, or None for any other failure (a crash, a timeout, a broken
    stream, a wrong answer). Only errors that came from the server (P2PHandlerError) count."""
    if not isinstance(error, P2PHandlerError):
        return None
    match = _REFUSAL.match(str(error))
    try:
        return ErrorCode(match["code"]) if match else None
    except ValueError:
        return None


@dataclass
class Message:
    tensors: list[torch.Tensor] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0  # bytes of tensor payload as received


def encode_metadata(metadata: dict[str, Any]) -> bytes:
    return msgpack.packb(metadata, use_bin_type=True)


def decode_metadata(raw: bytes) -> dict[str, Any]:
    if not raw:
        return {}
    if len(raw) > MAX_METADATA_BYTES:
        raise ProtocolError(f"metadata of {len(raw)} bytes exceeds {MAX_METADATA_BYTES}")
    try:
        metadata = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(f"malformed metadata: {e}") from None
    if not isinstance(metadata, dict):
        raise ProtocolError("metadata must be a map")
    return metadata


def pack_message(
    tensors: Sequence[torch.Tensor],
    metadata: Optional[dict[str, Any]] = None,
    *,
    proto: Type[Proto] = runtime_pb2.ExpertRequest,
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
    wire: Optional[str] = None,
) -> list[Proto]:
    """Encode a logical message as parts of at most ~max_part_bytes of tensor data each.

    wire (see config.WIRE_FORMATS) compresses floating-point tensors; None sends them as they are.
    """
    chunks: list[runtime_pb2.Tensor] = []
    for tensor in tensors:
        serialized = _serialize(tensor, wire)
        buffer = memoryview(serialized.buffer)
        num_chunks = max(1, -(-len(buffer) // max_part_bytes))
        first = runtime_pb2.Tensor(
            compression=serialized.compression,
            size=serialized.size,
            dtype=serialized.dtype,
            requires_grad=serialized.requires_grad,
            chunks=num_chunks,
            buffer=buffer[:max_part_bytes].tobytes(),
        )
        chunks.append(first)
        for offset in range(max_part_bytes, len(buffer), max_part_bytes):
            chunks.append(runtime_pb2.Tensor(buffer=buffer[offset : offset + max_part_bytes].tobytes()))

    parts: list[list[runtime_pb2.Tensor]] = [[]]
    part_bytes = 0
    for chunk in chunks:
        if parts[-1] and part_bytes + len(chunk.buffer) > max_part_bytes:
            parts.append([])
            part_bytes = 0
        parts[-1].append(chunk)
        part_bytes += len(chunk.buffer)

    first_metadata = dict(metadata or {})
    if len(parts) > 1:
        first_metadata[_PARTS_KEY] = len(parts)
    messages = [proto(tensors=parts[0], metadata=encode_metadata(first_metadata))]
    messages.extend(proto(tensors=part) for part in parts[1:])
    return messages


async def read_message(
    stream: AsyncIterator[Union[runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse]],
    *,
    max_bytes: int,
) -> Optional[Message]:
    """Read one logical message from a stream of parts; None if the stream ended before it began."""
    first = await anext(stream, None)
    if first is None:
        return None
    metadata = decode_metadata(first.metadata)
    num_parts = metadata.pop(_PARTS_KEY, 1)
    if not isinstance(num_parts, int) or not 1 <= num_parts <= MAX_PARTS:
        raise ProtocolError(f"invalid number of parts: {num_parts!r}")
    parts = [first]
    total = sum(len(t.buffer) for t in first.tensors)
    while len(parts) < num_parts:
        part = await anext(stream, None)
        if part is None:
            raise ProtocolError(f"stream ended after {len(parts)} of {num_parts} parts")
        if part.metadata:
            raise ProtocolError("metadata is allowed only in the first part of a message")
        total += sum(len(t.buffer) for t in part.tensors)
        if total > max_bytes:
            raise ProtocolError(f"message exceeds the server's limit of {max_bytes} bytes")
        parts.append(part)
    if total > max_bytes:
        raise ProtocolError(f"message exceeds the server's limit of {max_bytes} bytes")
    tensors = decode_tensors(chunk for part in parts for chunk in part.tensors)
    return Message(tensors, metadata, total)


def unpack_message(part: Union[runtime_pb2.ExpertRequest, runtime_pb2.ExpertResponse], *, max_bytes: int) -> Message:
    """A single-part message (unary calls)."""
    metadata = decode_metadata(part.metadata)
    if metadata.pop(_PARTS_KEY, 1) != 1:
        raise ProtocolError("a unary message must have exactly one part")
    total = sum(len(t.buffer) for t in part.tensors)
    if total > max_bytes:
        raise ProtocolError(f"message exceeds the limit of {max_bytes} bytes")
    return Message(decode_tensors(part.tensors), metadata, total)


def decode_tensors(chunks: Iterable[runtime_pb2.Tensor]) -> list[torch.Tensor]:
    """Join chunked tensors and deserialize them, rejecting unknown dtypes and inconsistent sizes."""
    tensors: list[torch.Tensor] = []
    head: Optional[runtime_pb2.Tensor] = None
    buffers: list[bytes] = []

    def finish() -> None:
        if head is None:
            return
        if len(buffers) != max(head.chunks, 1):
            raise ProtocolError(f"tensor announced {head.chunks} chunks, got {len(buffers)}")
        tensors.append(_deserialize(head, b"".join(buffers)))

    for chunk in chunks:
        if chunk.dtype:  # the first chunk of a tensor carries its dtype and shape
            finish()
            head, buffers = chunk, [chunk.buffer]
        elif head is None:
            raise ProtocolError("tensor chunk without a header")
        else:
            buffers.append(chunk.buffer)
    finish()
    return tensors


def wire_nbytes(tensor: torch.Tensor, wire: Optional[str] = None) -> int:
    """Bytes a floating tensor takes on the wire in `wire` format (None: as it is)."""
    if wire == "int8":
        return -(-tensor.numel() // WIRE_BLOCK) * (2 + WIRE_BLOCK)
    itemsize = WIRE_DTYPES[wire].itemsize if wire in WIRE_DTYPES else tensor.element_size()
    return tensor.numel() * itemsize


def _serialize(tensor: torch.Tensor, wire: Optional[str] = None) -> runtime_pb2.Tensor:
    """Raw little-endian bytes (hivemind's NONE compression layout), or the session's wire format."""
    tensor = tensor.detach()
    if wire is not None and tensor.is_floating_point():
        if wire == "int8":
            return _blockwise_8bit(tensor)
        tensor = tensor.to(WIRE_DTYPES[wire])
    dtype = str(tensor.dtype)[6:]  # "torch.float32" -> "float32"
    if dtype not in _TENSOR_DTYPES:
        return serialize_torch_tensor(tensor.cpu())
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return runtime_pb2.Tensor(
        compression=runtime_pb2.CompressionType.NONE,
        buffer=raw.numpy().tobytes(),
        size=tensor.shape,
        dtype=dtype,
        requires_grad=tensor.requires_grad,
    )


def _deserialize(head: runtime_pb2.Tensor, buffer: bytes) -> torch.Tensor:
    if head.dtype not in _TENSOR_DTYPES:
        raise ProtocolError(f"unsupported tensor dtype {head.dtype!r}")
    if len(head.size) > 8:
        raise ProtocolError(f"tensor of {len(head.size)} dimensions")
    numel = math.prod(head.size)
    # numpy cannot describe a shape whose nonzero dims multiply past 2**63 bytes, even with no values
    if math.prod(dim for dim in head.size if dim) * 8 >= 1 << 63:
        raise ProtocolError(f"tensor shape {list(head.size)} is too large")
    if head.compression == WIRE_INT8_TAG and head.dtype in WIRE_DTYPES:
        return _from_blockwise_8bit(head, buffer, numel)
    if head.compression == runtime_pb2.CompressionType.NONE:
        if numel * _ITEMSIZE[head.dtype] != len(buffer):
            raise ProtocolError(
                f"tensor of shape {list(head.size)} and dtype {head.dtype} needs "
                f"{numel * _ITEMSIZE[head.dtype]} bytes, got {len(buffer)}"
            )
        array = np.frombuffer(bytearray(buffer), dtype=_NUMPY_VIEWS[head.dtype]).reshape(tuple(head.size))
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if head.dtype == "bfloat16" else tensor
    if head.dtype not in WIRE_DTYPES:
        raise ProtocolError("only floating-point tensors may be compressed")
    whole = runtime_pb2.Tensor()
    whole.CopyFrom(head)
    whole.buffer = buffer
    whole.chunks = 0
    try:
        tensor = deserialize_torch_tensor(whole)
    except Exception as e:
        raise ProtocolError(f"cannot decode tensor: {e}") from None
    if tuple(tensor.shape) != tuple(head.size):
        raise ProtocolError(f"tensor decoded to shape {tuple(tensor.shape)}, announced {tuple(head.size)}")
    return tensor.detach()


def _blockwise_8bit(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """Blocks of WIRE_BLOCK values as int8 with one float16 absmax scale each:
    [scales: float16 x blocks][values: int8 x blocks * WIRE_BLOCK] (the last block zero-padded)."""
    flat = tensor.detach().float().cpu().reshape(-1).numpy()
    blocks = -(-flat.size // WIRE_BLOCK)
    padded = np.zeros(blocks * WIRE_BLOCK, dtype=np.float32)
    padded[: flat.size] = flat
    padded = padded.reshape(blocks, WIRE_BLOCK)
    scales = (np.abs(padded).max(axis=1) / 127).astype(np.float16)
    safe = np.where(scales == 0, np.float16(1), scales).astype(np.float32)
    values = np.clip(np.rint(padded / safe[:, None]), -127, 127).astype(np.int8)
    dtype = str(tensor.dtype)[6:]
    return runtime_pb2.Tensor(
        compression=WIRE_INT8_TAG,
        buffer=scales.tobytes() + values.tobytes(),
        size=tensor.shape,
        dtype=dtype if dtype in WIRE_DTYPES else "float32",
        requires_grad=False,
    )


def _from_blockwise_8bit(head: runtime_pb2.Tensor, buffer: bytes, numel: int) -> torch.Tensor:
    blocks = -(-numel // WIRE_BLOCK)
    if len(buffer) != blocks * (2 + WIRE_BLOCK):
        raise ProtocolError(f"an 8-bit tensor of {numel} values needs {blocks * (2 + WIRE_BLOCK)} bytes, got {len(buffer)}")
    scales = np.frombuffer(buffer, dtype=np.float16, count=blocks).astype(np.float32)
    if not np.all(np.isfinite(scales)):
        raise ProtocolError("8-bit tensor with non-finite scales")
    values = np.frombuffer(buffer, dtype=np.int8, offset=2 * blocks).reshape(blocks, WIRE_BLOCK)
    flat = (values.astype(np.float32) * scales[:, None]).reshape(-1)[:numel]
    return torch.from_numpy(flat.reshape(tuple(head.size))).to(WIRE_DTYPES[head.dtype])


_KIND_NAMES = {int: "an integer", str: "a string", float: "a number", list: "a list", dict: "a map", bool: "a boolean"}


def require(metadata: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    """Typed read of a metadata field: a clear ProtocolError instead of a KeyError or TypeError later."""
    if key not in metadata:
        if default is ...:
            raise ProtocolError(f"metadata field {key!r} is missing")
        return default
    value = metadata[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"metadata field {key!r} must be {_KIND_NAMES.get(kind, kind.__name__)}, got {type(value).__name__}")
    return value


PREFIX_PAGE_TOKENS = 16  # granularity of prefix hashes; servers with another page size do not reuse prefixes


def prefix_page_hashes(
    token_ids: Sequence[int], salt: str, *, start_page: int = 0, parent: str = "", page_tokens: int = PREFIX_PAGE_TOKENS
) -> list[str]:
    """Chained hashes of the full pages of a token sequence: hash i covers tokens [0, page_tokens * (i + 1)).

    Equal hashes mean equal whole prefixes under the same salt (model, adapters, prompts in use),
    so a server may reuse the pages behind them. Pages before start_page are skipped; parent is the
    hash of page start_page - 1 ("" for the first).
    """
    import hashlib

    hashes, previous = [], parent or hashlib.blake2b(salt.encode(), digest_size=16).hexdigest()
    for page in range(start_page, len(token_ids) // page_tokens):
        tokens = token_ids[page * page_tokens : (page + 1) * page_tokens]
        digest = hashlib.blake2b(previous.encode(), digest_size=16)
        digest.update(np.asarray(tokens, dtype=np.int64).tobytes())
        previous = digest.hexdigest()
        hashes.append(previous)
    return hashes
