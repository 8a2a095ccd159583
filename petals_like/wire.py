"""The metadata of every RPC, typed: one frozen dataclass per message, one parse per message.

protocol.py frames a message (tensors plus a metadata map); this module says what the map holds.
Each class has `to_meta()` (what the sender writes) and `from_meta()` (what the receiver reads),
and `from_meta` is the only place a field is checked for type and shape: it raises ProtocolError
(code bad_request) with the field's name. Limits that depend on the server (its span, its
max_length, its page size) are checked by the server's policy code, on these typed objects.

    rpc_forward / rpc_backward   SpanRequest            -> the output (or gradients), no metadata
    rpc_inference, first message OpenSession (+ Step)   -> OpenReply when it asks for one (probe)
    rpc_inference, later         Step                   -> StepReply with the output
    rpc_inference_mux, first     MuxHello               -> MuxReplies() (empty: the stream is ready)
    rpc_inference_mux, later     MuxSteps               -> MuxReplies, as steps finish
    rpc_push                     PushBatch              -> PushReply
    rpc_info                     (nothing)              -> InfoReply

Tensors travel beside the metadata: a step carries one [batch, seq, hidden] tensor; an open
message and a span request carry their TuningRef's tensors (deep prompts, then LoRA weights in
models/lora.py's wire order) after the hidden states.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from petals_like.protocol import RPC_INFO, ProtocolError, decode_metadata, require

MAX_ID_LENGTH = 128  # session ids, push tokens, adapter ids and names
MIN_PUSH_TOKEN_LENGTH = 16
MAX_HASH_LENGTH = 128
MAX_PUSH_CHAIN = 64  # hops in one push chain; longer chains are nonsense
MAX_PUSH_BATCH = 256  # pushed steps in one rpc_push message
MAX_MUX_STEPS = 1024  # steps in one rpc_inference_mux message


def _opt(meta: dict, key: str, kind: type, default: Any = ...) -> Any:
    """require(), where an optional field may also be sent as nil."""
    return require(meta, key, kind, default) if default is ... or meta.get(key) is not None else default


def _short_string(meta: dict, key: str, *, min_length: int = 1, default: Any = ...) -> Any:
    value = _opt(meta, key, str, default)
    if value is not default and not min_length <= len(value) <= MAX_ID_LENGTH:
        raise ProtocolError(f"{key} must have {min_length}..{MAX_ID_LENGTH} characters")
    return value


def _optional_bool(meta: dict, key: str) -> bool:
    value = meta.get(key)
    if value is not None and not isinstance(value, bool):
        raise ProtocolError(f"{key} must be true or false")
    return bool(value)


def _int_list(meta: dict, key: str) -> Optional[tuple[int, ...]]:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ProtocolError(f"{key} must be a list of integers")
    return tuple(value)


def _compact(meta: dict) -> dict:
    """Fields at their empty defaults are not sent."""
    return {k: v for k, v in meta.items() if v is not None and v is not False and v != () and v != []}


@dataclass(frozen=True)
class LoraRef:
    """A client-held LoRA (server/adapters.py): with `weights`, the request carries its tensors for the
    request's blocks; without, the server uses the copy it keeps for this client, id and version."""

    id: str
    version: int
    weights: bool = False
    rank: Optional[int] = None  # required with weights
    scaling: Optional[float] = None
    targets: tuple[str, ...] = ()

    @classmethod
    def from_meta(cls, raw: Any) -> LoraRef:
        if not isinstance(raw, dict):
            raise ProtocolError("lora must be a map")
        ref = cls(id=_short_string(raw, "id"), version=require(raw, "version", int), weights=require(raw, "weights", bool, False))
        if not ref.weights:
            return ref
        scaling = raw.get("scaling")
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or abs(scaling) > 1e4:
            raise ProtocolError(f"LoRA scaling must be a finite number of magnitude <= 1e4, got {scaling!r}")
        targets = require(raw, "targets", list)
        if not all(isinstance(t, str) for t in targets):
            raise ProtocolError("LoRA targets must be a list of projection names")
        return cls(ref.id, ref.version, True, require(raw, "rank", int), float(scaling), tuple(targets))

    def to_meta(self) -> dict:
        meta = {"id": self.id, "version": self.version, "weights": self.weights}
        if self.weights:
            meta.update(rank=self.rank, scaling=self.scaling, targets=list(self.targets))
        return meta


@dataclass(frozen=True)
class TuningRef:
    """What a request adds to the plain blocks: deep prompts (one tensor [blocks, prefix, hidden]),
    and either a hosted adapter (by name) or a client-held LoRA."""

    deep_prompts: bool = False
    adapter: Optional[str] = None
    lora: Optional[LoraRef] = None

    @classmethod
    def from_meta(cls, meta: dict) -> TuningRef:
        adapter = _short_string(meta, "adapter", default=None)
        lora = LoraRef.from_meta(meta["lora"]) if meta.get("lora") is not None else None
        if adapter is not None and lora is not None:
            raise ProtocolError("a request uses either a hosted adapter or a client LoRA, not both")
        return cls(_optional_bool(meta, "deep_prompts"), adapter, lora)

    def to_meta(self) -> dict:
        return _compact({"deep_prompts": self.deep_prompts, "adapter": self.adapter, "lora": self.lora and self.lora.to_meta()})

    @property
    def carries_tensors(self) -> bool:
        """An open message's tensors are this tuning's (prompts, LoRA weights), not a first step."""
        return self.deep_prompts or self.lora is not None


@dataclass(frozen=True)
class SpanRequest:
    """rpc_forward / rpc_backward: blocks [start, end) of the model, absolute."""

    start: int
    end: int
    pad_lens: Optional[tuple[int, ...]] = None  # left padding per sequence
    tuning: TuningRef = field(default_factory=TuningRef)

    @classmethod
    def from_meta(cls, meta: dict) -> SpanRequest:
        return cls(require(meta, "start", int), require(meta, "end", int), _int_list(meta, "pad_lens"), TuningRef.from_meta(meta))

    def to_meta(self) -> dict:
        meta = {"start": self.start, "end": self.end, **self.tuning.to_meta()}
        if self.pad_lens is not None:
            meta["pad_lens"] = list(self.pad_lens)
        return meta


@dataclass(frozen=True)
class PushHop:
    """One later server of the client's chain: where to push, the token that lets a push into that
    session, and the step metadata that server is to receive."""

    peer: str
    token: str
    step: Step

    @classmethod
    def from_meta(cls, raw: Any) -> PushHop:
        if not isinstance(raw, dict):
            raise ProtocolError("each push_chain hop must be a map")
        step = Step.from_meta(require(raw, "meta", dict))
        return cls(_short_string(raw, "peer"), _push_token(raw, "token"), step)

    def to_meta(self) -> dict:
        return {"peer": self.peer, "token": self.token, "meta": self.step.to_meta()}


@dataclass(frozen=True)
class Step:
    """One inference step of a session: its tokens' hidden states travel as the message's tensor.

    position: tokens before this step (a step that arrives twice is answered from the kept output);
    reuse_tokens: on the first step, leading positions taken from the prefix cache (not sent);
    page_hashes from page hash_start on: chained hashes of the session's full pages (prefix reuse);
    push_chain: the later servers to push the output to (server/handler.py); close: end the session;
    rewind: first drop the session's tokens from `position` on (a client rolling the session back);
    hypo_ids: then row i continues what row hypo_ids[i] held (beam search), before this step's tokens.
    """

    session_id: str
    position: Optional[int] = None
    reuse_tokens: int = 0
    page_hashes: tuple[str, ...] = ()
    hash_start: int = 0
    push_chain: tuple[PushHop, ...] = ()
    close: bool = False
    rewind: bool = False
    hypo_ids: tuple[int, ...] = ()

    @classmethod
    def from_meta(cls, meta: dict) -> Step:
        hashes = meta.get("page_hashes") or []
        if not isinstance(hashes, list) or not all(isinstance(h, str) and 0 < len(h) <= MAX_HASH_LENGTH for h in hashes):
            raise ProtocolError("page_hashes must be a list of short strings")
        chain = meta.get("push_chain") or []
        if not isinstance(chain, list) or len(chain) > MAX_PUSH_CHAIN:
            raise ProtocolError(f"push_chain must be a list of at most {MAX_PUSH_CHAIN} hops")
        step = cls(
            session_id=_short_string(meta, "session_id"),
            position=_opt(meta, "position", int, None),
            reuse_tokens=_opt(meta, "reuse_tokens", int, 0),
            page_hashes=tuple(hashes),
            hash_start=_opt(meta, "hash_start", int, 0),
            push_chain=tuple(PushHop.from_meta(hop) for hop in chain),
            close=_optional_bool(meta, "close"),
            rewind=_optional_bool(meta, "rewind"),
            hypo_ids=_int_list(meta, "hypo_ids") or (),
        )
        if step.rewind and (step.position is None or step.position < 0):
            raise ProtocolError("a rewinding step must say the position it rewinds to")
        return step

    def to_meta(self) -> dict:
        meta = {
            "session_id": self.session_id,
            "position": self.position,
            "reuse_tokens": self.reuse_tokens or None,
            "push_chain": [hop.to_meta() for hop in self.push_chain],
            "close": self.close,
            "rewind": self.rewind,
            "hypo_ids": list(self.hypo_ids),
        }
        if self.page_hashes:
            meta.update(page_hashes=list(self.page_hashes), hash_start=self.hash_start)
        return _compact(meta)


@dataclass(frozen=True)
class OpenSession:
    """The first message of an rpc_inference stream (its metadata may also be the first Step's).

    push_token: the secret a previous server must show to push steps into this session; probe: answer
    at once with an OpenReply (how many of the hashed prefix's tokens are cached, or the refusal of
    the wire format); wire: how this session's outputs travel (config.WIRE_FORMATS)."""

    session_id: str
    start: int
    end: int
    max_length: int
    batch_size: int
    pad_lens: Optional[tuple[int, ...]] = None
    tuning: TuningRef = field(default_factory=TuningRef)
    push_token: Optional[str] = None
    wire: Optional[str] = None
    probe: bool = False
    mux: Optional[str] = None  # the id of the client's rpc_inference_mux stream that answers this session's steps

    @classmethod
    def from_meta(cls, meta: dict) -> OpenSession:
        return cls(
            session_id=_short_string(meta, "session_id"),
            start=require(meta, "start", int),
            end=require(meta, "end", int),
            max_length=require(meta, "max_length", int),
            batch_size=require(meta, "batch_size", int),
            pad_lens=_int_list(meta, "pad_lens"),
            tuning=TuningRef.from_meta(meta),
            push_token=_push_token(meta, default=None),
            wire=_opt(meta, "wire", str, None),
            probe=_optional_bool(meta, "probe"),
            mux=_short_string(meta, "mux", default=None),
        )

    def to_meta(self, first_step: Optional[Step] = None) -> dict:
        keys = ("session_id", "start", "end", "max_length", "batch_size", "push_token", "wire", "mux")
        meta = {k: getattr(self, k) for k in keys}
        meta.update(pad_lens=self.pad_lens and list(self.pad_lens), probe=self.probe, **self.tuning.to_meta())
        if first_step is not None:
            meta.update(first_step.to_meta())
        return _compact(meta)


def _push_token(meta: dict, key: str = "push_token", default: Any = ...) -> Any:
    """The secret that lets a server push into a session: long enough not to be guessed."""
    return _short_string(meta, key, min_length=MIN_PUSH_TOKEN_LENGTH, default=default)


@dataclass(frozen=True)
class PushedStep:
    """A step one server sends to the next on the client's behalf: the Step the client wrote for the
    next server (its push_chain now the rest of the chain), and that session's push token."""

    step: Step
    token: str

    @classmethod
    def from_meta(cls, raw: Any) -> PushedStep:
        if not isinstance(raw, dict):
            raise ProtocolError("each push must be a map")
        return cls(Step.from_meta(raw), _push_token(raw))

    def to_meta(self) -> dict:
        return {**self.step.to_meta(), "push_token": self.token}


@dataclass(frozen=True)
class PushBatch:
    """rpc_push: one tensor per pushed step, in order. Each push is parsed on its own: a malformed one
    is refused (None here) without refusing the others."""

    pushes: tuple[Optional[PushedStep], ...]

    @classmethod
    def from_meta(cls, meta: dict, num_tensors: int) -> PushBatch:
        pushes = require(meta, "pushes", list)
        if not 1 <= len(pushes) <= MAX_PUSH_BATCH or len(pushes) != num_tensors:
            raise ProtocolError(f"pushes must list 1..{MAX_PUSH_BATCH} steps, one per tensor")

        def parse(raw: Any) -> Optional[PushedStep]:
            try:
                return PushedStep.from_meta(raw)
            except ProtocolError:
                return None

        return cls(tuple(parse(raw) for raw in pushes))

    def to_meta(self) -> dict:
        return {"pushes": [push.to_meta() for push in self.pushes]}


@dataclass(frozen=True)
class PushReply:
    accepted: tuple[bool, ...]

    @classmethod
    def from_meta(cls, meta: dict) -> PushReply:
        accepted = require(meta, "accepted", list)
        if not all(isinstance(a, bool) for a in accepted):
            raise ProtocolError("accepted must be a list of booleans")
        return cls(tuple(accepted))

    def to_meta(self) -> dict:
        return {"accepted": list(self.accepted)}


@dataclass(frozen=True)
class OpenReply:
    """The answer to an open message with probe: tokens of the client's hashed prefix cached here."""

    cached_tokens: int = 0

    @classmethod
    def from_meta(cls, meta: dict) -> OpenReply:
        return cls(max(0, require(meta, "cached_tokens", int, 0)))

    def to_meta(self) -> dict:
        return {"cached_tokens": self.cached_tokens}


@dataclass(frozen=True)
class StepReply:
    """The answer to a step (its output is the tensor): the position it answers, whether the server
    pushed the output to the next server of the chain, and the server's time on it."""

    position: int
    step: int = 0  # steps this session has run on the server
    pushed: Optional[bool] = None  # None: no push was asked
    compute_s: float = 0.0  # from the session taking the step to the answer leaving
    iterations_s: float = 0.0  # of which the scheduler iterations that ran its tokens

    @classmethod
    def from_meta(cls, meta: dict) -> StepReply:
        pushed = meta.get("pushed")
        if pushed is not None and not isinstance(pushed, bool):
            raise ProtocolError("pushed must be true or false")
        seconds = []
        for key in ("compute_s", "iterations_s"):
            value = meta.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProtocolError(f"{key} must be a number")
            seconds.append(float(value))
        return cls(require(meta, "position", int), require(meta, "step", int, 0), pushed, *seconds)

    def to_meta(self) -> dict:
        meta = {"position": self.position, "step": self.step, "compute_s": self.compute_s, "iterations_s": self.iterations_s}
        if self.pushed is not None:
            meta["pushed"] = self.pushed
        return meta


@dataclass(frozen=True)
class MuxHello:
    """The first message of an rpc_inference_mux stream: the id that sessions opened with
    OpenSession.mux name it by, and the wire format of the outputs it carries."""

    mux_id: str
    wire: Optional[str] = None

    @classmethod
    def from_meta(cls, meta: dict) -> MuxHello:
        return cls(_short_string(meta, "mux_id"), _opt(meta, "wire", str, None))

    def to_meta(self) -> dict:
        return _compact({"mux_id": self.mux_id, "wire": self.wire})


@dataclass(frozen=True)
class MuxSteps:
    """A later client message on an rpc_inference_mux stream: one Step per session, each with one
    tensor (its hidden states), in order."""

    steps: tuple[Step, ...]

    @classmethod
    def from_meta(cls, meta: dict, num_tensors: int) -> MuxSteps:
        steps = require(meta, "steps", list)
        if not 1 <= len(steps) <= MAX_MUX_STEPS or len(steps) != num_tensors:
            raise ProtocolError(f"steps must list 1..{MAX_MUX_STEPS} steps, one per tensor")
        if not all(isinstance(step, dict) for step in steps):
            raise ProtocolError("each step must be a map")
        return cls(tuple(Step.from_meta(step) for step in steps))

    def to_meta(self) -> dict:
        return {"steps": [step.to_meta() for step in self.steps]}


@dataclass(frozen=True)
class MuxReply:
    """One session's answer on a mux stream: a StepReply (the message then carries its output), or
    the error that ended the session (its text as a stream would carry it, ErrorCode included)."""

    session_id: str
    reply: Optional[StepReply] = None
    error: Optional[str] = None

    @classmethod
    def from_meta(cls, raw: Any) -> MuxReply:
        if not isinstance(raw, dict):
            raise ProtocolError("each mux reply must be a map")
        error = _opt(raw, "error", str, None)
        reply = None if error is not None else StepReply.from_meta(require(raw, "reply", dict))
        return cls(_short_string(raw, "session_id"), reply, error)

    def to_meta(self) -> dict:
        return _compact({"session_id": self.session_id, "reply": self.reply and self.reply.to_meta(), "error": self.error})


@dataclass(frozen=True)
class MuxReplies:
    """The server's message on an rpc_inference_mux stream: the answers that are ready, one tensor per
    reply without an error, in order."""

    replies: tuple[MuxReply, ...] = ()

    @classmethod
    def from_meta(cls, meta: dict, num_tensors: int) -> MuxReplies:
        replies = tuple(MuxReply.from_meta(raw) for raw in require(meta, "replies", list))
        if sum(r.error is None for r in replies) != num_tensors:
            raise ProtocolError("a mux message carries one tensor per reply without an error")
        return cls(replies)

    def to_meta(self) -> dict:
        return {"replies": [reply.to_meta() for reply in self.replies]}


@dataclass(frozen=True)
class InfoReply:
    """rpc_info: the server's live ServerInfo fields (`announced`, as in its DHT record), its limits,
    and counters (for health checks: with no session open, free plus prefix-cached pages make the
    whole pool, and asyncio_tasks returns to its idle level; a leak shows as growth)."""

    protocol_version: int
    server_version: str
    num_blocks: int
    hidden_size: int
    max_session_length: int
    max_batch_size: int
    max_request_tokens: int
    page_size: int
    cache_tokens_left: int
    cache_tokens_total: int
    prefix_cache_tokens: int
    open_sessions: int
    iterations: int
    inference_tokens: int
    busy_seconds: float
    pushes_sent: int
    push_messages_sent: int
    pushes_received: int
    forward_calls: int
    asyncio_tasks: int
    mux_messages_received: int
    mux_steps_received: int
    stream_steps_received: int
    announced: dict = field(default_factory=dict)
    experts: dict = field(default_factory=dict)  # MoE spans: models/moe.py's span_expert_stats()

    @classmethod
    def from_meta(cls, meta: dict) -> InfoReply:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in ("announced", "experts"):
                continue
            kind = {"server_version": str, "busy_seconds": (int, float)}.get(f.name, int)
            value = meta.get(f.name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ProtocolError(f"rpc_info field {f.name!r} is missing or of the wrong type")
            values[f.name] = value
        experts = meta.get("experts") if isinstance(meta.get("experts"), dict) else {}
        announced = {k: v for k, v in meta.items() if k not in values and k != "experts"}
        return cls(**values, announced=announced, experts=experts)

    def to_meta(self) -> dict:
        meta = asdict(self)
        return {**meta.pop("announced"), **meta}


async def call_info(p2p: P2P, peer_id: str, *, timeout: float) -> InfoReply:
    """A server's rpc_info answer: what clients ping, servers measure their next hops with, and the
    dashboard probes."""
    request = p2p.call_protobuf_handler(
        PeerID.from_base58(peer_id), RPC_INFO, runtime_pb2.ExpertRequest(), runtime_pb2.ExpertResponse
    )
    response = await asyncio.wait_for(request, timeout)
    return InfoReply.from_meta(decode_metadata(response.metadata))
