"""The typed wire (petals_like/wire.py) and the error codes of refusals (protocol.ErrorCode)."""

from __future__ import annotations

import pytest
from hivemind.p2p import P2PHandlerError

from petals_like.protocol import ErrorCode, ProtocolError, decode_metadata, encode_metadata, refusal_code
from petals_like.wire import (
    MAX_ID_LENGTH,
    MAX_PUSH_CHAIN,
    InfoReply,
    LoraRef,
    OpenReply,
    OpenSession,
    PushBatch,
    PushedStep,
    PushHop,
    PushReply,
    SpanRequest,
    Step,
    StepReply,
    TuningRef,
)

TOKEN = "t" * 16
LORA = LoraRef("adapter-1", 7, True, 4, 0.5, ("q_proj", "v_proj"))
STEP = Step("s1", position=32, reuse_tokens=16, page_hashes=("h1", "h2"), hash_start=1)
MESSAGES = [
    LORA,
    LoraRef("adapter-1", 7),  # a reference to cached weights: no rank, scaling or targets
    TuningRef(deep_prompts=True, lora=LORA),
    TuningRef(adapter="chat"),
    SpanRequest(2, 6),
    SpanRequest(0, 8, (0, 2), TuningRef(deep_prompts=True, adapter="chat")),
    Step("s1"),
    STEP,
    Step("s1", position=3, push_chain=(PushHop("peer-b", TOKEN, Step("s2", position=3)),), close=True),
    OpenSession("s1", 0, 8, 64, 2, (1, 0), TuningRef(lora=LORA), TOKEN, "int8", probe=True),
    OpenSession("s1", 0, 8, 64, 1),
    PushBatch((PushedStep(Step("s2", position=5), TOKEN), PushedStep(STEP, TOKEN))),
    PushReply((True, False)),
    OpenReply(48),
    StepReply(32, 3, True, 0.25),
    StepReply(0),
]


@pytest.mark.parametrize("message", MESSAGES, ids=[f"{type(m).__name__}-{i}" for i, m in enumerate(MESSAGES)])
def test_every_message_reads_back_as_written(message):
    """to_meta -> msgpack -> from_meta gives the same message: what a sender writes, the receiver reads."""
    meta = decode_metadata(encode_metadata(message.to_meta()))
    parse = type(message).from_meta
    read = parse(meta, len(message.pushes)) if isinstance(message, PushBatch) else parse(meta)
    assert read == message


def test_the_open_message_also_carries_the_first_step():
    meta = OpenSession("s1", 0, 8, 64, 1, push_token=TOKEN).to_meta(STEP)
    assert OpenSession.from_meta(meta) == OpenSession("s1", 0, 8, 64, 1, push_token=TOKEN)
    assert Step.from_meta(meta) == STEP


def test_info_reply_keeps_the_announced_fields_apart():
    skip = ("announced", "experts", "server_version", "busy_seconds")
    counters = {f: 1 for f in InfoReply.__dataclass_fields__ if f not in skip}
    info = InfoReply(
        **counters, server_version="1.0", busy_seconds=0.5, announced={"start_block": 2, "state": "online"}, experts={"calls": 3}
    )
    meta = info.to_meta()
    assert meta["start_block"] == 2 and meta["open_sessions"] == 1  # flat on the wire
    assert InfoReply.from_meta(meta) == info
    with pytest.raises(ProtocolError, match="'open_sessions'"):
        InfoReply.from_meta({k: v for k, v in meta.items() if k != "open_sessions"})


MALFORMED = [
    (Step.from_meta, {}, "'session_id' is missing"),
    (Step.from_meta, {"session_id": ""}, "session_id must have"),
    (Step.from_meta, {"session_id": "s" * (MAX_ID_LENGTH + 1)}, "session_id must have"),
    (Step.from_meta, {"session_id": "s", "position": "3"}, "'position' must be an integer"),
    (Step.from_meta, {"session_id": "s", "position": True}, "'position' must be an integer"),
    (Step.from_meta, {"session_id": "s", "page_hashes": ["ok", 5]}, "page_hashes"),
    (Step.from_meta, {"session_id": "s", "close": "yes"}, "close must be true or false"),
    (Step.from_meta, {"session_id": "s", "push_chain": [{}] * (MAX_PUSH_CHAIN + 1)}, "push_chain"),
    (Step.from_meta, {"session_id": "s", "push_chain": ["peer"]}, "hop must be a map"),
    (Step.from_meta, {"session_id": "s", "push_chain": [{"peer": "p", "token": "short", "meta": {}}]}, "'session_id'"),
    (Step.from_meta, {"session_id": "s", "push_chain": [{"peer": "p", "token": "short", "meta": {"session_id": "x"}}]}, "token"),
    (OpenSession.from_meta, {"session_id": "s", "start": 0, "end": 8, "max_length": 8}, "'batch_size' is missing"),
    (
        OpenSession.from_meta,
        {"session_id": "s", "start": 0, "end": 8, "max_length": 8, "batch_size": 1, "push_token": "x"},
        "push_token",
    ),
    (SpanRequest.from_meta, {"start": 0, "end": 8, "pad_lens": [0, "1"]}, "pad_lens must be a list of integers"),
    (SpanRequest.from_meta, {"start": 0, "end": 8, "deep_prompts": 1}, "deep_prompts must be true or false"),
    (SpanRequest.from_meta, {"start": 0, "end": 8, "adapter": "a", "lora": LORA.to_meta()}, "either a hosted adapter or"),
    (SpanRequest.from_meta, {"start": 0, "end": 8, "lora": "adapter-1"}, "lora must be a map"),
    (LoraRef.from_meta, dict(LORA.to_meta(), scaling=float("nan")), "scaling must be a finite number"),
    (LoraRef.from_meta, dict(LORA.to_meta(), targets=["q_proj", 1]), "targets must be a list of projection names"),
    (LoraRef.from_meta, dict(LORA.to_meta(), rank=None), "'rank' must be an integer"),
    (StepReply.from_meta, {"position": 1, "pushed": "no"}, "pushed must be true or false"),
    (PushReply.from_meta, {"accepted": [1]}, "accepted must be a list of booleans"),
]


@pytest.mark.parametrize("parse, meta, expected", MALFORMED, ids=[m[2] for m in MALFORMED])
def test_a_malformed_field_is_a_bad_request_that_names_it(parse, meta, expected):
    with pytest.raises(ProtocolError, match=expected.replace("(", r"\(")) as error:
        parse(meta)
    assert error.value.code is ErrorCode.BAD_REQUEST


def test_a_malformed_push_is_refused_alone():
    """One push of a batch that does not parse is refused (None) while the others go on."""
    good = PushedStep(Step("s1", position=2), TOKEN).to_meta()
    batch = PushBatch.from_meta({"pushes": [good, {"session_id": "s2", "position": 2}, "junk"]}, 3)
    assert batch.pushes[0] == PushedStep(Step("s1", position=2), TOKEN) and batch.pushes[1:] == (None, None)
    with pytest.raises(ProtocolError, match="one per tensor"):
        PushBatch.from_meta({"pushes": [good]}, 2)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_the_code_of_a_refusal_survives_both_ways_hivemind_sends_errors(code):
    """Unary calls get repr(error), streams str(error) (after "server X answered: " in client/transport.py)."""
    error = ProtocolError("session 'x' said [bad_request] inside", code)
    for text in (repr(error), str(error), f"server abc123 answered: {error}"):
        assert refusal_code(P2PHandlerError(text)) is code


def test_only_a_servers_refusal_has_a_code():
    assert refusal_code(ProtocolError("raised here")) is None  # not from a server
    assert refusal_code(P2PHandlerError("RuntimeError('[bad_request] a crash quoting a request')")) is None
    assert refusal_code(P2PHandlerError("ProtocolError('[no_such_code] x')")) is None
    assert refusal_code(P2PHandlerError("ProtocolError('no code')")) is None
    assert str(ProtocolError("a wrong answer", code=None)) == "a wrong answer"
