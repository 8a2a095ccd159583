"""Value types shared by every package: server state and info, spans, block uids.

A ServerInfo travels as a DHT record (a plain dict, msgpack-encoded by hivemind). Readers keep
the fields they know and ignore the rest, so servers of different versions can share a swarm.
Records are written by strangers: from_record() validates every field and raises ValueError.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Mapping, Optional

MAX_BLOCKS = 100_000  # no real model has more blocks; larger indices in a record are nonsense
MAX_RATE = 1e9  # tokens/s; a larger announced throughput is nonsense
MAX_TEXT = 256  # characters in free-form record fields (dtype, public name, version, ...)
MAX_ADAPTERS = 64
MAX_PINGS = 64
MAX_ADDRS = 8  # multiaddrs in a record: a few transports and relays


class ServerState(IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


def _check_number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name}={value} not in [{low}, {high}]")
    return value


def _check_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"{name} must be a string of at most {MAX_TEXT} characters")
    return value


@dataclass(frozen=True)
class ServerInfo:
    """What a server announces for each block it hosts (one record per block, same value for its whole span)."""

    state: ServerState
    start_block: int  # the server's span is [start_block, end_block)
    end_block: int
    throughput: float = 0.0  # tokens/s the swarm can expect from this server for one block (used by routing)
    inference_rps: float = 0.0  # decode steps/s over its span at batch 1
    forward_rps: float = 0.0  # forward tokens/s over its span
    cache_tokens_left: int = 0  # free KV cache tokens, for routing new sessions
    open_sessions: int = 0  # inference sessions open on this server
    load: float = 0.0  # fraction of the last announce period the server spent computing (0..1)
    version: str = ""
    torch_dtype: str = "float32"
    quant_type: str = "none"
    adapters: tuple[str, ...] = ()
    public_name: str = ""
    next_pings: Mapping[str, float] = field(default_factory=dict)  # peer id -> round-trip seconds
    using_relay: bool = False  # behind NAT: reached through the relays in addrs (dht/relay.py)
    addrs: tuple[str, ...] = ()  # multiaddrs to dial it at: its own, or relay circuits when using_relay

    def to_record(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["state"] = int(self.state)
        record["adapters"] = list(self.adapters)
        record["next_pings"] = dict(self.next_pings)
        record["addrs"] = list(self.addrs)
        return record

    @classmethod
    def from_record(cls, raw: Any) -> ServerInfo:
        """Validate a record read from the DHT; unknown fields are dropped so versions can mix."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"server info must be a mapping, got {type(raw).__name__}")
        try:
            state = ServerState(raw["state"])
            start, end = raw["start_block"], raw["end_block"]
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"server info lacks a valid state or span: {e!r}") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= MAX_BLOCKS):
            raise ValueError(f"span [{start!r}, {end!r}) is not a valid block range")
        kwargs: dict[str, Any] = dict(state=state, start_block=start, end_block=end)
        for name in ("throughput", "inference_rps", "forward_rps"):
            if name in raw:
                kwargs[name] = _check_number(name, raw[name], 0.0, MAX_RATE)
        if "cache_tokens_left" in raw:
            kwargs["cache_tokens_left"] = int(_check_number("cache_tokens_left", raw["cache_tokens_left"], 0, 2**40))
        if "open_sessions" in raw:
            kwargs["open_sessions"] = int(_check_number("open_sessions", raw["open_sessions"], 0, 2**31))
        if "load" in raw:
            kwargs["load"] = _check_number("load", raw["load"], 0.0, 1.0)
        for name in ("version", "torch_dtype", "quant_type", "public_name"):
            if name in raw:
                kwargs[name] = _check_text(name, raw[name])
        if "adapters" in raw:
            adapters = raw["adapters"]
            if not isinstance(adapters, (list, tuple)) or len(adapters) > MAX_ADAPTERS:
                raise ValueError("adapters must be a short list of names")
            kwargs["adapters"] = tuple(_check_text("adapter", a) for a in adapters)
        if "next_pings" in raw:
            pings = raw["next_pings"]
            if not isinstance(pings, Mapping) or len(pings) > MAX_PINGS:
                raise ValueError("next_pings must be a small mapping")
            kwargs["next_pings"] = {_check_text("peer id", k): _check_number("ping", v, 0.0, 3600.0) for k, v in pings.items()}
        if "using_relay" in raw:
            if not isinstance(raw["using_relay"], bool):
                raise ValueError("using_relay must be true or false")
            kwargs["using_relay"] = raw["using_relay"]
        if "addrs" in raw:
            addrs = raw["addrs"]
            if not isinstance(addrs, (list, tuple)) or len(addrs) > MAX_ADDRS:
                raise ValueError(f"addrs must be a list of at most {MAX_ADDRS} multiaddrs")
            kwargs["addrs"] = tuple(_check_text("multiaddr", a) for a in addrs)
            if not all(a.startswith("/") for a in kwargs["addrs"]):
                raise ValueError("addrs must be multiaddrs (/ip4/...)")
        return cls(**kwargs)

    @property
    def num_blocks(self) -> int:
        return self.end_block - self.start_block


@dataclass(frozen=True)
class RemoteSpanInfo:
    """A server as seen by a client: its peer id and the span it serves (maybe cut to a sub-range)."""

    peer_id: str  # base58 libp2p peer id
    start: int
    end: int
    server_info: ServerInfo

    @property
    def length(self) -> int:
        return self.end - self.start

    def cut(self, start: int, end: int) -> RemoteSpanInfo:
        """The same server restricted to [start, end), which must lie inside its span."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"[{start}, {end}) is not inside [{self.start}, {self.end})")
        return dataclasses.replace(self, start=start, end=end)

    def __repr__(self) -> str:
        return f"Span({self.peer_id[-6:]}, {self.start}:{self.end})"


def parse_block_range(text: str, num_blocks: Optional[int] = None) -> tuple[int, int]:
    """'A:B' -> (A, B), checked against the model's number of blocks when given."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ValueError(f"block range must look like START:END, got {text!r}") from None
    if not 0 <= start < end or (num_blocks is not None and end > num_blocks):
        limit = f" of a model with {num_blocks} blocks" if num_blocks is not None else ""
        raise ValueError(f"block range {start}:{end} is not a non-empty range{limit}")
    return start, end
