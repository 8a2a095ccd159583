"""Property-based fuzzing of every RPC handler's inputs on a live swarm.

Hypothesis writes hostile requests: metadata with fields kept, dropped, retyped, huge or nested,
plus unknown keys; tensors of wrong shape, dtype, count or value (NaN, infinity, 1e30), raw tensor
protobufs with impossible sizes, chunk counts and compressions; inference streams whose messages
come in any order (steps before the open, foreign session ids, steps past max_length, pushes,
truncated multi-part messages, early close and abrupt disconnects). Every call must end in a
result or a clear error: a ProtocolError answered to that caller alone. A well-behaved session
steps alongside every example and must match a plain forward of its inputs; after every example
the server holds no session but the good one and every KV page is accounted for; after every
batch both servers answer rpc_info and a good client's greedy generation equals transformers'.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pytest
import torch
from hivemind.p2p import P2P, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from petals_like.client.transport import InferenceStream, call_forward
from petals_like.config import WIRE_FORMATS
from petals_like.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import default_dht_prefix
from petals_like.models.lora import wire_shapes
from petals_like.protocol import (
    MAX_PARTS,
    RPC_BACKWARD,
    RPC_FORWARD,
    RPC_INFERENCE,
    RPC_INFO,
    RPC_PUSH,
    WIRE_INT8_TAG,
    Message,
    ProtocolError,
    decode_metadata,
    decode_tensors,
    encode_metadata,
    pack_message,
    read_message,
)
from petals_like.wire import MAX_HASH_LENGTH, MAX_PUSH_CHAIN, call_info
from petals_like.wire import MAX_ID_LENGTH as MAX_SESSION_ID_LENGTH
from tests.swarm import HIDDEN, Swarm, assert_still_serves, start_swarm, wait_until

NUM_BLOCKS = 8
MAX_SESSION_LENGTH = 64
MAX_BATCH_SIZE = 4
MAX_REQUEST_TOKENS = 256
MAX_MESSAGE_BYTES = 256 * 1024  # a (1, 1100, 64) float32 tensor is over it
CALL_TIMEOUT = 20.0  # seconds for any one exchange: a server that takes longer is hung
GOOD_LENGTH = 16  # tokens per good session (a 4-token prefill, then single steps)

# sentinels replaced when a request is sent, since strategies cannot see the live swarm
GOOD_SID = "<good session>"  # the well-behaved session's id: a hostile client tries to hijack it
OWN_SID = "<own session>"  # the id the hostile stream opens (pushes aim at it)
OWN_TOKEN = "<own token>"  # that session's push token, if its open message sets it
PEER_A, PEER_B = "<peer of 0:4>", "<peer of 4:8>"
LORA_WEIGHTS = "<lora weights>"  # in a tensor list: the LoRA tensors the request's metadata asks for

FUZZ_SETTINGS = dict(
    deadline=None,
    database=None,  # no saved examples: every run explores afresh; a failure prints its reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# ---- the swarm and the harness ----


@pytest.fixture(scope="module")
def swarm(tiny_model: Path, hosted_adapter: Path) -> Iterator[Swarm]:
    swarm = start_swarm(
        tiny_model,
        ["0:4", "4:8"],
        adapters=(str(hosted_adapter),),
        kv_cache_tokens=40 * 16,
        page_size=16,
        max_alloc_timeout=0.2,
        max_session_length=MAX_SESSION_LENGTH,
        max_batch_size=MAX_BATCH_SIZE,
        max_request_tokens=MAX_REQUEST_TOKENS,
        max_message_bytes=MAX_MESSAGE_BYTES,
        push_timeout=1.0,
        max_lora_rank=4,
    )
    try:
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
        yield swarm
    finally:
        swarm.shutdown()


class ServerErrors(logging.Handler):
    """Exceptions that escaped a stream handler or the scheduler (the servers run in this process).

    A unary handler's error reaches the caller as repr(exception) and is checked there; a stream
    handler's reaches it as str(exception) only, so its type is read from hivemind's log here.
    """

    LOGGERS = ("hivemind.p2p.p2p_daemon", "petals_like.server")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.unclear: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if record.name.startswith("petals_like") and record.levelno >= logging.ERROR:
            self.unclear.append(f"{record.getMessage()}: {error!r}")  # compute failed: other sessions too
        elif record.getMessage().startswith("Handler failed") and not isinstance(error, ProtocolError):
            self.unclear.append(f"a handler raised {error!r}")

    def take(self) -> list[str]:
        unclear, self.unclear = self.unclear, []
        return unclear


class GoodSession:
    """A well-behaved client's session on server 0:4, stepped alongside the hostile calls.

    It opens with a push token (a hostile client must not push into it) and runs to GOOD_LENGTH
    tokens; then its outputs must equal the server's forward over all its inputs.
    """

    def __init__(self, node: SwarmNode, span: RemoteSpanInfo):
        self.node, self.span = node, span
        self.sid = "good-" + uuid.uuid4().hex
        self.stream: Optional[InferenceStream] = None
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(0)

    @property
    def length(self) -> int:
        return sum(t.shape[1] for t in self.inputs)

    async def step(self) -> None:
        if self.stream is None:
            self.sid = "good-" + uuid.uuid4().hex
            self.stream = InferenceStream(self.node.p2p, self.span)
            await self.stream.open(timeout=CALL_TIMEOUT)
            hidden = torch.randn(1, 4, HIDDEN, generator=self.generator)
            meta = {
                "session_id": self.sid,
                "start": 0,
                "end": 4,
                "max_length": GOOD_LENGTH,
                "batch_size": 1,
                "push_token": uuid.uuid4().hex,
            }
        else:
            hidden = torch.randn(1, 1, HIDDEN, generator=self.generator)
            meta = {"session_id": self.sid}
        try:
            self.outputs.append(await self.stream.step(hidden, meta, timeout=CALL_TIMEOUT))
        except BaseException:  # the next example starts a new good session
            stream, self.stream, self.inputs, self.outputs = self.stream, None, [], []
            await stream.close()
            raise
        self.inputs.append(hidden)
        if self.length == GOOD_LENGTH:
            await self.finish()

    async def finish(self) -> None:
        if self.stream is None:
            return
        stream, self.stream = self.stream, None
        await stream.close({"session_id": self.sid})
        inputs, outputs = torch.cat(self.inputs, dim=1), torch.cat(self.outputs, dim=1)
        self.inputs, self.outputs = [], []
        expected = await call_forward(self.node.p2p, self.span, inputs, None, timeout=CALL_TIMEOUT)
        assert torch.allclose(outputs, expected, atol=1e-4), "the good session's outputs differ from a forward"

    def held_pages(self, server) -> int:
        session = server.sessions.sessions.get(self.sid) if self.stream is not None else None
        return 0 if session is None else sum(len(rows.pages) for rows in session.sequences)


@dataclass
class Harness:
    swarm: Swarm
    node: SwarmNode  # the hostile client's (and the good session's) node
    errors: ServerErrors
    good: Optional[GoodSession] = None
    own: dict[str, str] = field(default_factory=dict)  # OWN_SID / OWN_TOKEN of the current example

    def span(self, index: int = 0) -> RemoteSpanInfo:
        server = self.swarm.servers[index]
        start, end = (0, 4) if index == 0 else (4, 8)
        return RemoteSpanInfo(server.node.peer_id, start, end, ServerInfo(ServerState.ONLINE, start, end))

    def peer(self, index: int = 0) -> PeerID:
        return PeerID.from_base58(self.swarm.servers[index].node.peer_id)

    def fill(self, value: Any) -> Any:
        """Replace the sentinels in a metadata value by the live swarm's ids."""
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        if value == GOOD_SID:
            return self.good.sid
        if value in (PEER_A, PEER_B):
            return self.swarm.servers[0 if value == PEER_A else 1].node.peer_id
        if value in (OWN_SID, OWN_TOKEN):
            return self.own.get(value, value)
        return value

    def expand(self, items: Sequence[Any], meta: dict) -> list[torch.Tensor | runtime_pb2.Tensor]:
        """Tensors, raw tensor protobufs and LORA_WEIGHTS (the LoRA tensors `meta` asks for) -> a request's list."""
        out: list = []
        for item in items:
            if isinstance(item, str):  # LORA_WEIGHTS
                out += lora_weights(self.swarm.servers[0].handlers.backend.spec, meta)
            else:
                out.append(item)
        return out

    def request(self, items: Sequence[Any], meta: dict) -> runtime_pb2.ExpertRequest:
        """One unary request; raw protobufs are sent as they are."""
        meta = self.fill(meta)
        chunks = []
        for item in self.expand(items, meta):
            chunks += [item] if isinstance(item, runtime_pb2.Tensor) else list(pack_message([item])[0].tensors)
        return runtime_pb2.ExpertRequest(metadata=encode_metadata(meta), tensors=chunks)

    def parts(self, items: Sequence[Any], meta: dict, part_bytes: int, wire: Optional[str]) -> list[runtime_pb2.ExpertRequest]:
        """One logical message as stream parts (several when part_bytes is small); raw protobufs join the last part."""
        meta = self.fill(meta)
        items = self.expand(items, meta)
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        with np.errstate(all="ignore"):  # int8 wire compression of NaN or 1e30 values
            parts = pack_message(tensors, meta, max_part_bytes=part_bytes, wire=wire)
        parts[-1].tensors.extend(t for t in items if isinstance(t, runtime_pb2.Tensor))
        return parts

    def settled(self) -> bool:
        """No session but the good one on either server, and every page free, indexed or the good one's."""
        for server in self.swarm.servers:
            sessions, pool = server.sessions, server.sessions.pool
            if set(sessions.sessions) - {self.good.sid}:
                return False
            if pool.num_free + len(sessions.prefix_index) + self.good.held_pages(server) != pool.num_pages:
                return False
        return True

    def describe(self) -> str:
        return "; ".join(
            f"server {i}: sessions {sorted(s.sessions.sessions)}, {s.sessions.pool.num_free} free + "
            f"{len(s.sessions.prefix_index)} indexed + {self.good.held_pages(s)} good of "
            f"{s.sessions.pool.num_pages} pages"
            for i, s in enumerate(self.swarm.servers)
        )

    def after_example(self) -> None:
        try:
            wait_until(self.settled, 5, interval=0.01)
        except TimeoutError:
            state = self.describe()
            for server in self.swarm.servers:  # the next examples start clean, so that shrinking finds the culprit
                for session in list(server.sessions.sessions.values()):
                    if session.session_id != self.good.sid:
                        server.node.call_soon(server.sessions.close, session)
            raise AssertionError(f"sessions left open or KV pages lost: {state}") from None
        unclear = self.errors.take()
        assert not unclear, f"servers raised errors other than ProtocolError: {unclear}"

    def run(self, hostile, with_good: bool = True) -> Any:
        """Run a hostile coroutine with a good step alongside, check the servers settled, return its result."""

        async def both() -> Any:
            if with_good and self.good.stream is None:
                # open the good session first: a hostile open naming its id must meet a session that
                # exists, not race the good client to create it (whoever comes first owns an id)
                await self.good.step()
            calls = [hostile, self.good.step()] if with_good else [hostile]
            results = await asyncio.gather(*calls, return_exceptions=True)  # both end before the next example
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            return results[0]

        result = self.node.run(both(), timeout=3 * CALL_TIMEOUT)
        self.after_example()
        return result


@pytest.fixture(scope="module")
def harness(swarm: Swarm) -> Iterator[Harness]:
    node = SwarmNode(swarm.peers, client_mode=True, name="fuzz-client")
    errors = ServerErrors()
    for name in ServerErrors.LOGGERS:
        logging.getLogger(name).addHandler(errors)
    harness = Harness(swarm, node, errors)
    harness.good = GoodSession(node, harness.span(0))
    try:
        yield harness
    finally:
        for name in ServerErrors.LOGGERS:
            logging.getLogger(name).removeHandler(errors)
        node.shutdown()


@pytest.fixture
def healthy(harness: Harness, model, reference) -> Iterator[Harness]:
    """The harness; after the test's batch of examples, the swarm must still serve good clients exactly."""
    yield harness
    harness.node.run(harness.good.finish(), timeout=CALL_TIMEOUT)
    for index in range(2):
        info = harness.node.run(call_info(harness.node.p2p, harness.span(index).peer_id, timeout=10))
        assert (info.announced["start_block"], info.announced["end_block"]) == ((0, 4), (4, 8))[index]
    assert_still_serves(harness.node, harness.span(0))
    prompt = torch.randint(4, 300, (1, 20), generator=torch.Generator().manual_seed(7))  # 3 is <pad>
    expected = reference.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, eos_token_id=[]), expected)
    harness.after_example()


# ---- strategies ----

TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
HEX = st.text("0123456789abcdef", min_size=1, max_size=2)  # few values, so hashes and ids collide
SCALAR = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | TEXT | st.binary(max_size=12)
JUNK = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)


def mutated(
    valid: dict[str, Any], optional: Sequence[str] = (), plausible: Optional[dict[str, st.SearchStrategy]] = None
) -> st.SearchStrategy[dict]:
    """`valid` as it is, with some `optional` fields and unknown keys, with one field broken, or with
    many (a quarter each): a broken field is dropped or replaced by a plausible value (`plausible`,
    else FIELDS) or junk. Mostly-valid requests are what reach the deeper checks."""

    @st.composite
    def build(draw) -> dict:
        level = draw(st.integers(0, 3))
        broken: set[str] = set()
        if level == 2 and valid:
            broken = {draw(st.sampled_from(sorted(valid)))}
        elif level == 3:
            broken = {key for key in valid if draw(st.booleans())}
        meta = {}
        for key, value in valid.items():
            if key not in broken:
                meta[key] = value
            elif draw(st.integers(0, 3)) > 0:
                meta[key] = draw(field_value(key, plausible))
        if level > 0:
            for key in optional:
                if draw(st.integers(0, 9)) == 9:
                    meta[key] = draw(field_value(key, plausible))
            if draw(st.integers(0, 9)) == 9:
                meta.update(draw(st.dictionaries(TEXT, JUNK, min_size=1, max_size=2)))
        return meta

    return build()


def field_value(key: str, plausible: Optional[dict[str, st.SearchStrategy]] = None) -> st.SearchStrategy:
    value = (plausible or {}).get(key, FIELDS.get(key))
    return JUNK if value is None else st.one_of(value, value, value, JUNK)


def tokens(*lengths: int) -> st.SearchStrategy[str]:
    return st.sampled_from(lengths).map(lambda n: "k" * n)


LORA = mutated({"id": "fuzz", "version": 1, "rank": 2, "scaling": 2.0, "targets": ["q_proj", "v_proj"], "weights": True})
HOP = st.fixed_dictionaries(
    {
        "peer": st.sampled_from([PEER_A, PEER_B]) | TEXT,
        "token": st.just(OWN_TOKEN) | TEXT,
        "meta": st.fixed_dictionaries({"session_id": st.just(OWN_SID), "position": st.integers(0, 8)}) | JUNK,
    }
)
FIELDS: dict[str, st.SearchStrategy] = {
    "start": st.integers(-1, 9),
    "end": st.integers(-1, 9),
    "session_id": st.sampled_from([GOOD_SID, OWN_SID, "", "s" * (MAX_SESSION_ID_LENGTH + 1)]) | HEX,
    "max_length": st.sampled_from([-1, 0, 1, 3, 16, 64, 65, 2**63]),
    "batch_size": st.integers(-1, MAX_BATCH_SIZE + 1),
    "pad_lens": st.lists(st.integers(-1, 20), max_size=5),
    "wire": st.sampled_from([*WIRE_FORMATS, "int4", ""]),
    "push_token": st.just(OWN_TOKEN) | tokens(0, 15, 16, MAX_SESSION_ID_LENGTH, MAX_SESSION_ID_LENGTH + 1),
    "page_hashes": st.lists(HEX, max_size=5)
    | st.lists(st.sampled_from(["", "h" * (MAX_HASH_LENGTH + 1)]), min_size=1, max_size=2),
    "hash_start": st.integers(-1, 6),
    "probe": st.booleans(),
    "adapter": st.sampled_from(["chat", "", "nope"]),  # "chat" is hosted (tests/test_finetune.py)
    "deep_prompts": st.booleans(),
    "lora": LORA,
    "targets": st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "nope"]), max_size=3),
    "rank": st.integers(-1, 6),
    "scaling": st.sampled_from([0.0, 1.0, float("inf"), float("nan"), 1e5, True]),
    "version": st.integers(-1, 2),
    "position": st.integers(-1, 70),
    "reuse_tokens": st.sampled_from([-16, 0, 1, 16, 32, 80]),
    "push_chain": st.lists(HOP, max_size=2) | st.lists(HOP, min_size=MAX_PUSH_CHAIN + 1, max_size=MAX_PUSH_CHAIN + 1),
    "close": st.booleans(),
    "_parts": st.sampled_from([0, 2, MAX_PARTS + 1, True]),
}
SPAN_OPTIONAL = ("pad_lens", "deep_prompts", "adapter", "lora", "_parts")
OPEN_OPTIONAL = (
    "pad_lens",
    "wire",
    "page_hashes",
    "hash_start",
    "probe",
    "adapter",
    "deep_prompts",
    "lora",
    "position",
    "reuse_tokens",
    "close",
)
STEP_OPTIONAL = ("position", "reuse_tokens", "push_chain", "close", "page_hashes", "hash_start", "_parts")

DTYPES = [torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.float64, torch.bool, torch.uint8]
HOSTILE_SHAPES = st.one_of(
    st.tuples(st.integers(0, MAX_BATCH_SIZE + 1), st.integers(0, 9), st.sampled_from([HIDDEN, HIDDEN + 1, 1, 0])),
    st.lists(st.integers(0, 5), max_size=4).map(tuple),
    st.sampled_from([(1, MAX_REQUEST_TOKENS + 1, HIDDEN), (1, 1100, HIDDEN), (2, 40, HIDDEN)]),  # over the limits
)


@st.composite
def tensors(draw, shape: tuple[int, ...]) -> torch.Tensor:
    """Mostly a finite float32 tensor of `shape`; else another shape or dtype, NaN, infinity or 1e30."""
    if draw(st.integers(0, 9)) == 9:
        shape = draw(HOSTILE_SHAPES)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    if draw(st.integers(0, 9)) == 9 and values.numel():
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), 1e30]))
    if draw(st.integers(0, 9)) == 9:
        values = values.to(draw(st.sampled_from(DTYPES)))
    return values


@st.composite
def raw_tensors(draw) -> runtime_pb2.Tensor:
    """A tensor protobuf as a hostile peer may write it: any size, dtype, compression, buffer, chunk count."""
    size = draw(st.lists(st.sampled_from([0, 1, 2, 3, HIDDEN, 2**32 - 1]), max_size=9))
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "int64", "int32", "float64", "bool", "", "object"]))
    numel = 1
    for dim in size:
        numel *= dim
    if draw(st.booleans()) and dtype in ("float32", "int32") and numel <= 4096:
        buffer = bytes(4 * numel)  # the right length for an uncompressed tensor
    else:
        buffer = draw(st.binary(max_size=300))
    return runtime_pb2.Tensor(
        buffer=buffer,
        size=size,
        dtype=dtype,
        compression=draw(st.integers(0, 6)),
        chunks=draw(st.integers(0, 3)),
        requires_grad=draw(st.booleans()),
    )


def lora_weights(spec, meta: dict) -> list[torch.Tensor]:
    """The tensors a request's "lora" metadata asks for, if it is well-formed enough to say; else none."""
    lora = meta.get("lora")
    try:
        rank, targets = int(lora["rank"]), list(lora["targets"])
        shapes = wire_shapes(spec, rank, targets, meta["end"] - meta["start"])
    except Exception:  # junk metadata: the server must refuse it anyway
        return []
    if not 0 < rank <= 8 or len(shapes) > 64:
        return []
    generator = torch.Generator().manual_seed(rank)
    return [torch.randn(shape, generator=generator) * 0.01 for shape in shapes]


@st.composite
def tensor_lists(draw, shape: tuple[int, ...], count: int, meta: dict, prompt_blocks: int) -> list:
    """`count` tensors of `shape`, then deep prompts and LoRA weights if `meta` asks for them;
    sometimes a tensor dropped or extra ones, raw protobufs among them."""
    items: list = [draw(tensors(shape)) for _ in range(count)]
    if meta.get("deep_prompts") is True and draw(st.integers(0, 9)) < 8:
        prefix = draw(st.integers(1, max(1, shape[1])))
        items.append(draw(tensors((prompt_blocks, prefix, HIDDEN))))
    if isinstance(meta.get("lora"), dict) and draw(st.integers(0, 9)) < 8:
        items.append(LORA_WEIGHTS)
    how = draw(st.integers(0, 19))
    if how == 17 and items:
        del items[draw(st.integers(0, len(items) - 1))]
    elif how == 18:
        items.append(draw(tensors(shape)))
    elif how == 19:
        raws = draw(st.lists(raw_tensors(), min_size=1, max_size=2))
        at = draw(st.integers(0, len(items)))
        items[at:at] = raws
    return items


@st.composite
def span_requests(draw, num_hidden: int) -> tuple[dict, list]:
    """A forward (1 tensor) or backward (hidden states and grad_outputs) request for server 0:4."""
    start, end = draw(st.sampled_from([(0, 4), (0, 2), (1, 3), (3, 4)]))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    meta = draw(mutated({"start": start, "end": end}, SPAN_OPTIONAL))
    return meta, draw(tensor_lists((batch, seq, HIDDEN), num_hidden, meta, end - start))


@dataclass
class Send:
    """One logical message on a stream, cut in parts of part_bytes; only the first `keep` parts if set.
    answered: a well-formed step, which the server answers (with its output or an error);
    wait: read one answer before the next action (pushes need the session idle at a known length)."""

    items: list
    meta: dict
    part_bytes: int = 1 << 20
    wire: Optional[str] = None
    keep: Optional[int] = None
    answered: bool = False
    wait: bool = False


@dataclass
class Raw:
    """A protobuf part written as it is."""

    request: runtime_pb2.ExpertRequest


@dataclass
class Push:
    """A unary rpc_push next to the stream, as a previous server of the chain would send it."""

    items: list
    meta: dict


@dataclass
class Script:
    """One hostile inference stream: its session id and push token, what it sends, how it ends."""

    sid: str
    token: str
    actions: list
    end: str  # "eos": end of stream; "close": a close message, then the end; "abort": the connection just drops


@st.composite
def framings(draw) -> dict:
    """How a Send travels: its part size (small ones cut a message in several parts), wire format, parts kept."""
    part_bytes = draw(st.sampled_from([1 << 20, 1 << 20, 1 << 20, 700]))
    wire = draw(st.sampled_from([None, None, None, "float16", "bfloat16", "int8"]))
    keep = draw(st.integers(1, 2)) if part_bytes < 1024 and draw(st.integers(0, 4)) == 4 else None
    return dict(part_bytes=part_bytes, wire=wire, keep=keep)


@st.composite
def sends(draw, items: list, meta: dict, step: bool = False) -> Send:
    """A Send of items and meta; if it is a step the server will answer, maybe wait for the answer."""
    framing = draw(framings())
    answered = (
        step
        and framing["keep"] is None
        and not meta.get("close")
        and meta.get("_parts", 1) in (1, True)
        and any(isinstance(item, torch.Tensor) for item in items)
    )
    return Send(items, meta, **framing, answered=answered, wait=answered and draw(st.booleans()))


@st.composite
def scripts(draw) -> Script:
    """An open message, then steps (mostly well-formed and in order), raw parts and pushes, then an ending.

    The script tracks the session's length as if every step were taken, so that positions and
    pushes are often right and the repeated-step and push paths are reached."""
    sid, token = "fuzz-" + draw(HEX), "k" * 16 + draw(HEX)
    batch = draw(st.integers(1, 2))
    max_length = draw(st.sampled_from([MAX_SESSION_LENGTH, 16, 4]))
    valid = {"session_id": OWN_SID, "start": 0, "end": 4, "max_length": max_length, "batch_size": batch}
    if draw(st.booleans()):
        valid["push_token"] = OWN_TOKEN
    open_meta = draw(mutated(valid, OPEN_OPTIONAL))
    # with deep prompts or LoRA weights the open message carries those, mostly without a first step
    extras = bool(open_meta.get("deep_prompts") or open_meta.get("lora"))
    with_step = draw(st.integers(0, 3)) == 3 if extras else draw(st.integers(0, 3)) < 3
    seq = draw(st.sampled_from([2, 1, 5, 16]))
    first = draw(tensor_lists((batch, seq, HIDDEN), int(with_step), open_meta, 4))
    actions: list = [draw(sends(first, open_meta, step=with_step and not extras))]
    length, last = (seq if with_step else 0), seq
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["step", "step", "step", "push", "raw"]))
        if kind == "raw":
            metadata = draw(st.binary(max_size=20) | st.builds(encode_metadata, mutated({"session_id": OWN_SID})))
            raws = draw(st.lists(raw_tensors(), max_size=2))
            actions.append(Raw(runtime_pb2.ExpertRequest(metadata=metadata, tensors=raws)))
            continue
        seq = draw(st.sampled_from([last, 1, 1, 2, 16]))
        positions = {"position": st.sampled_from([length, length - last, length + 1, -1])}  # next, repeat, gap
        if kind == "step":
            meta = draw(mutated({"session_id": OWN_SID}, STEP_OPTIONAL, positions))
        else:
            meta = draw(
                mutated(
                    {"session_id": OWN_SID, "push_token": OWN_TOKEN, "position": length},
                    ("close", "probe", "push_chain"),
                    positions,
                )
            )
        items = draw(tensor_lists((batch, seq, HIDDEN), 1, meta, 4))
        if kind == "push" and isinstance(actions[-1], Send) and actions[-1].answered:
            actions[-1].wait = True  # a push is taken only while the session waits for the step
        actions.append(draw(sends(items, meta, step=True)) if kind == "step" else Push(items, meta))
        length, last = length + seq, seq
    return Script(sid, token, actions, draw(st.sampled_from(["eos", "eos", "close", "abort"])))


# ---- talking to the servers ----


async def unary(h: Harness, index: int, name: str, request: runtime_pb2.ExpertRequest) -> Optional[Message]:
    """The answer, or None after a clear error; an unclear error fails the test."""
    try:
        response = await asyncio.wait_for(
            h.node.p2p.call_protobuf_handler(h.peer(index), name, request, runtime_pb2.ExpertResponse), CALL_TIMEOUT
        )
    except P2PHandlerError as e:
        assert str(e).startswith("ProtocolError("), f"{name} answered an unclear error: {e}"
        return None
    return Message(decode_tensors(response.tensors), decode_metadata(response.metadata))


async def stream_exchange(h: Harness, name: str, actions: Sequence[Any], end: str) -> list[Message]:
    """Write the actions to a new stream of server 0:4, end it, read every answer until the server closes it.

    An error answer ends the stream (whether it was clear is read from the servers' log); pushes
    go as unary calls between the writes. end: "eos", "close" (a close message first) or "abort".
    """
    _, reader, writer = await asyncio.wait_for(h.node.p2p.call_binary_stream_handler(h.peer(0), name), CALL_TIMEOUT)
    answers: asyncio.Queue = asyncio.Queue()  # whole answers as they come; None once the server ended the stream

    async def collect() -> None:
        async def parts():
            while True:
                try:
                    response, error = await P2P.receive_protobuf(runtime_pb2.ExpertResponse, reader)
                except (asyncio.IncompleteReadError, ConnectionError):  # the server closed the stream
                    return
                if error is not None:
                    return
                yield response

        responses = parts()
        while (message := await read_message(responses, max_bytes=1 << 30)) is not None:
            await answers.put(message)
        await answers.put(None)

    collector = asyncio.create_task(collect())
    messages: list[Message] = []
    try:
        try:
            for action in actions:
                if isinstance(action, Push):
                    await unary(h, 0, RPC_PUSH, h.request(action.items, {"pushes": [action.meta]}))
                    continue
                if isinstance(action, Raw):
                    parts = [action.request]
                else:
                    parts = h.parts(action.items, action.meta, action.part_bytes, action.wire)[: action.keep]
                for part in parts:
                    await P2P.send_protobuf(part, writer)
                if isinstance(action, Send) and action.wait:
                    try:
                        message = await asyncio.wait_for(answers.get(), 1.0)
                    except asyncio.TimeoutError:  # not answered yet: go on writing
                        continue
                    if message is None:  # an error answer: the stream is over
                        return messages
                    messages.append(message)
            if end == "abort":  # no end of stream: the connection just drops
                return messages
            if end == "close":
                close = {"session_id": h.own.get(OWN_SID, ""), "close": True}
                await P2P.send_protobuf(runtime_pb2.ExpertRequest(metadata=encode_metadata(close)), writer)
            await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        except ConnectionError:  # the server already ended the stream; its answers are still to be read
            pass
        await asyncio.wait_for(collector, CALL_TIMEOUT)  # a server that never closes the stream is hung
        while (message := answers.get_nowait()) is not None:
            messages.append(message)
        return messages
    finally:
        collector.cancel()
        writer.close()


def expected_shape(items: Sequence[Any]) -> Optional[tuple[int, ...]]:
    """The shape of a request's first tensor, which an accepted forward or backward answers with."""
    if not items or isinstance(items[0], str):
        return None
    return tuple(items[0].size) if isinstance(items[0], runtime_pb2.Tensor) else tuple(items[0].shape)


def check_step_answer(message: Message) -> None:
    """A step's answer: one [batch, seq, hidden] tensor at a position; or a probe's answer: cached tokens."""
    if not message.tensors:
        assert isinstance(message.metadata.get("cached_tokens"), int), message.metadata
        return
    (out,) = message.tensors
    assert out.ndim == 3 and out.shape[2] == HIDDEN and isinstance(message.metadata.get("position"), int)


# ---- the fuzz tests: each runs a batch of examples, then `healthy` checks the swarm ----


NESTED = b"\x91" * 100_000 + b"\xc0"  # a msgpack list 100000 levels deep


@settings(max_examples=60, **FUZZ_SETTINGS)
@given(
    name=st.sampled_from([RPC_INFO, RPC_FORWARD, RPC_BACKWARD, RPC_PUSH]),
    request=st.builds(
        runtime_pb2.ExpertRequest,
        tensors=st.lists(raw_tensors(), max_size=2),
        metadata=st.binary(max_size=40) | st.dictionaries(TEXT, JUNK, max_size=4).map(encode_metadata),
    ),
)
@example(name=RPC_FORWARD, request=runtime_pb2.ExpertRequest(metadata=NESTED))
@example(name=RPC_PUSH, request=runtime_pb2.ExpertRequest(metadata=b"\xdd\xff\xff\xff\xff"))  # a 4G-item list
def fuzz_unary_bytes(h: Harness, name: str, request: runtime_pb2.ExpertRequest) -> None:
    answer = h.run(unary(h, 0, name, request))
    if name == RPC_INFO:  # it reads nothing from the request
        assert answer is not None and answer.metadata["end_block"] == 4


def test_unary_calls_answer_any_bytes(healthy: Harness):
    """rpc_info answers whatever it is sent; the other unary calls answer junk with a clear error."""
    fuzz_unary_bytes(healthy)


HUGE_EMPTY = runtime_pb2.Tensor(size=[0, 2**32 - 1, 2**32 - 1], dtype="float32")  # no values, an impossible shape


@settings(max_examples=400, **FUZZ_SETTINGS)
@given(
    call=st.booleans().flatmap(lambda backward: st.tuples(st.just(backward), span_requests(1 + backward))),
    streamed=st.sampled_from([None, None, "eos", "abort"]),
    framing=framings(),
)
@example(call=(False, ({"start": 0, "end": 4}, [HUGE_EMPTY])), streamed=None, framing={})
@example(call=(True, ({"start": 0, "end": 4}, [HUGE_EMPTY, HUGE_EMPTY])), streamed="eos", framing={})
def fuzz_span_call(h: Harness, call: tuple[bool, tuple[dict, list]], streamed: Optional[str], framing: dict) -> None:
    backward, (meta, items) = call
    name = RPC_BACKWARD if backward else RPC_FORWARD
    h.own.clear()

    async def exchange() -> list[Message]:
        if streamed is not None:
            return await stream_exchange(h, name + "_stream", [Send(items, meta, **framing)], streamed)
        answer = await unary(h, 0, name, h.request(items, meta))
        return [] if answer is None else [answer]

    answers = h.run(exchange())
    event("accepted" if answers else "refused")
    for answer in answers:  # accepted: the hidden states' result (or gradient) comes first
        assert tuple(answer.tensors[0].shape) == expected_shape(items)


def test_forward_and_backward_fuzz(healthy: Harness):
    """rpc_forward, rpc_backward and their _stream variants: hostile metadata, tensors, protobufs, cut streams."""
    fuzz_span_call(healthy)


@settings(max_examples=400, **FUZZ_SETTINGS)
@given(script=scripts())
def fuzz_inference(h: Harness, script: Script) -> None:
    h.own = {OWN_SID: script.sid, OWN_TOKEN: script.token}

    messages = h.run(stream_exchange(h, RPC_INFERENCE, script.actions, script.end))
    event(f"{sum(bool(m.tensors) for m in messages)} step(s) answered")
    for message in messages:
        check_step_answer(message)


def test_inference_fuzz(healthy: Harness):
    """rpc_inference streams, with rpc_push calls beside them: hostile opens, steps, orders and endings."""
    fuzz_inference(healthy)


@settings(max_examples=60, **FUZZ_SETTINGS)
@given(
    meta=mutated(
        {"session_id": GOOD_SID, "push_token": "k" * 16, "position": 4},
        ("close", "probe", "push_chain", "reuse_tokens", "_parts"),
    ),
    items=st.lists(tensors((1, 1, HIDDEN)) | raw_tensors(), max_size=2),
    wrapped=st.booleans(),
)
# hmac.compare_digest refuses str with non-ASCII characters: the token reached it as str and raised TypeError
@example(meta={"session_id": GOOD_SID, "push_token": "\x80", "position": 4}, items=[torch.zeros(1, 1, HIDDEN)], wrapped=True)
def fuzz_push(h: Harness, meta: dict, items: list, wrapped: bool) -> None:
    h.own.clear()

    async def exchange() -> None:
        answer = await unary(h, 0, RPC_PUSH, h.request(items, {"pushes": [meta]} if wrapped else meta))
        assert answer is None or answer.metadata == {"accepted": [False]}, "a push without the session's token was taken"

    h.run(exchange())


def test_push_fuzz(healthy: Harness):
    """rpc_push aimed at a live good session without its token: always refused, clearly, and harmless."""
    fuzz_push(healthy)


# ---- regressions: inputs the fuzzing found, minimized, and bugs found while writing it ----


def test_empty_tensor_with_huge_dims_is_refused():
    """No values, but numpy cannot even describe the shape: a ProtocolError, not numpy's ValueError."""
    for compression in (runtime_pb2.CompressionType.NONE, WIRE_INT8_TAG, runtime_pb2.CompressionType.BLOCKWISE_8BIT):
        chunk = runtime_pb2.Tensor(size=[0, 2**32 - 1, 2**32 - 1], dtype="float32", compression=compression)
        with pytest.raises(ProtocolError):
            decode_tensors([chunk])


def test_open_then_disconnect_leaves_no_session(healthy: Harness):
    """A client that opens a session and drops the connection at once: asyncio.wait_for (Python < 3.12)
    returned the open message and dropped the stream's cancellation, so the session lingered until
    the idle timeout. The race hit about one attempt in five, so 20 attempts all but always catch it."""
    h = healthy
    meta = {"session_id": OWN_SID, "start": 0, "end": 4, "max_length": 16, "batch_size": 1}
    for attempt in range(20):
        h.own = {OWN_SID: f"fuzz-drop-{attempt}"}
        h.run(stream_exchange(h, RPC_INFERENCE, [Send([], meta)], "abort"), with_good=False)


def test_prefix_pages_reported_at_open_are_held_until_the_first_step(healthy: Harness):
    """A probe's cached pages were only looked up, not held: pool pressure between the open and the first
    step could evict them and hand them to another session, whose keys the reusing session then read."""
    h = healthy
    pool = h.swarm.servers[0].sessions.pool
    gen = torch.Generator().manual_seed(1)
    prefix, new = torch.randn(1, 16, HIDDEN, generator=gen), torch.randn(1, 1, HIDDEN, generator=gen)
    hashes = ["fuzz-" + uuid.uuid4().hex]

    def open_meta(sid: str, batch_size: int = 1, **extra) -> dict:
        return {"session_id": sid, "start": 0, "end": 4, "max_length": 32, "batch_size": batch_size, **extra}

    async def run() -> tuple[torch.Tensor, torch.Tensor]:
        streams = [InferenceStream(h.node.p2p, h.span(0)) for _ in range(pool.num_pages // 4 + 3)]
        for stream in streams:
            await stream.open(timeout=CALL_TIMEOUT)
        first, reuser, hogs = streams[0], streams[1], streams[2:]
        try:
            await first.step(prefix, open_meta("first", page_hashes=hashes), timeout=CALL_TIMEOUT)  # publishes a page
            await first.close({"session_id": "first"})
            await reuser.send([], open_meta("reuser", page_hashes=hashes, probe=True))
            assert (await reuser.read(timeout=CALL_TIMEOUT)).metadata["cached_tokens"] == 16
            for i, hog in enumerate(hogs):  # 4 rows x 16 tokens: 4 pages each, until none are left
                try:
                    hidden = torch.randn(4, 16, HIDDEN, generator=gen)
                    await hog.step(hidden, open_meta(f"hog{i}", 4), timeout=CALL_TIMEOUT)
                except P2PHandlerError as e:
                    assert "KV cache is full" in str(e)
                    break
            await hogs[0].close({"session_id": "hog0"})  # room for the reuser's new token
            out = await reuser.step(new, {"session_id": "reuser", "reuse_tokens": 16}, timeout=CALL_TIMEOUT)
            whole = torch.cat([prefix, new], dim=1)
            whole = await call_forward(h.node.p2p, h.span(0), whole, None, timeout=CALL_TIMEOUT)
            return out, whole[:, -1:]
        finally:
            for stream in streams:
                await stream.close()

    out, expected = h.node.run(run(), timeout=4 * CALL_TIMEOUT)
    assert torch.allclose(out, expected, atol=1e-4), "the reused prefix is not the one the session was offered"
    h.after_example()


def test_last_step_repeated_at_max_length_is_answered_from_the_kept_output(healthy: Harness):
    """A step sent again (pushed, then relayed by a client that did not see the push through) is
    answered from the kept output; it was refused as past max_length when it was the session's last."""
    h = healthy
    h.own = {OWN_SID: "fuzz-repeat"}
    prompt, last = torch.randn(1, 3, HIDDEN), torch.randn(1, 1, HIDDEN)
    actions = [
        Send([prompt], {"session_id": OWN_SID, "start": 0, "end": 4, "max_length": 4, "batch_size": 1}),
        Send([last], {"session_id": OWN_SID, "position": 3}),
        Send([last], {"session_id": OWN_SID, "position": 3}),
    ]
    first, second, repeated = h.run(stream_exchange(h, RPC_INFERENCE, actions, "eos"), with_good=False)
    assert second.metadata["position"] == repeated.metadata["position"] == 3
    assert torch.equal(second.tensors[0], repeated.tensors[0])
