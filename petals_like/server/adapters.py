"""Adapters on a server: hosted PEFT LoRA folders, client-held LoRA weights, deep prompts in requests.

What a request names (wire.TuningRef, on forward, backward and the opening of inference sessions):
  "adapter": name        a LoRA this server hosts (run_server --adapters), for inference or training
                          of other parameters through it; never trained here
  "deep_prompts": true   one more tensor [blocks, prefix, hidden]: added to the first `prefix`
                          positions before each block; backward returns its gradient
  "lora": {"id", "version", "rank", "scaling", "targets", "weights"}
                          a client-held LoRA. With "weights": true the request carries its tensors
                          for the request's blocks (models/lora.py wire order) and the server keeps
                          them for this client and id; later requests of the same version may omit
                          them. A request naming a version the server does not hold is refused with
                          the code adapter_not_cached, and the client sends the weights again. Backward
                          returns their gradients after the hidden states' (and the prompts').

Client weights are kept per (client peer id, adapter id, version): a new version replaces the old
ones unless an open inference session still uses them. Unused weights are dropped after
`adapter_idle_timeout`. A client can never name another client's weights. Everything a client
makes the server hold (cached weights, weights and deep prompts of its open sessions) counts
against `max_adapter_bytes` for that client; a request over it is refused and changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from petals_like.config import ServerConfig
from petals_like.models.lora import BlockLora, canonical_targets, from_wire, read_peft_adapter, wire_shapes
from petals_like.models.span import BlockRange
from petals_like.models.spec import ModelSpec
from petals_like.protocol import WIRE_DTYPES, ErrorCode, ProtocolError, all_finite
from petals_like.wire import MAX_ID_LENGTH, LoraRef, TuningRef

logger = logging.getLogger(__name__)


@dataclass
class Tuning:
    """What a request adds to the plain blocks, resolved to tensors on the compute device."""

    prompts: Optional[torch.Tensor] = None  # [blocks, prefix, hidden]
    lora: Optional[list[BlockLora]] = None  # one per block of the request
    lora_targets: tuple[str, ...] = ()  # set for a client-held LoRA: backward returns its gradients
    lora_key: Optional[tuple[str, str, int]] = None  # (peer, adapter id, version) of a client-held LoRA

    @property
    def empty(self) -> bool:
        return self.prompts is None and self.lora is None


@dataclass
class _ClientEntry:
    rank: int
    scaling: float
    targets: tuple[str, ...]
    blocks: dict[int, BlockLora]  # absolute block index -> weights
    last_used: float
    sessions: int = 0  # open inference sessions that use these weights: never dropped meanwhile

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())


class AdapterStore:
    def __init__(
        self,
        spec: ModelSpec,
        span_start: int,
        span_end: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        max_rank: int = ServerConfig.max_lora_rank,
        max_bytes_per_peer: int = ServerConfig.max_adapter_bytes,
        idle_timeout: float = ServerConfig.adapter_idle_timeout,
    ):
        self.spec = spec
        self.span_start, self.span_end = span_start, span_end
        self.dtype, self.device = dtype, device
        self.max_rank = max_rank
        self.max_bytes_per_peer = max_bytes_per_peer
        self.idle_timeout = idle_timeout
        self.hosted: dict[str, dict[int, BlockLora]] = {}
        self._clients: dict[tuple[str, str, int], _ClientEntry] = {}  # (peer, adapter id, version) -> weights
        self._prompt_bytes: dict[str, int] = {}  # peer -> bytes of deep prompts held by its open sessions
        self._lock = threading.Lock()  # entries are read on the event loop and by the balance thread

    # ---- hosted adapters ----

    def load_hosted(self, paths: Sequence[str | Path]) -> None:
        """run_server --adapters: each PEFT folder (or NAME=PATH) for this server's blocks."""
        for item in paths:
            name, path = adapter_arg(item)
            _, blocks = read_peft_adapter(path, self.spec, range(self.span_start, self.span_end))
            self.hosted[name] = {i: lora.to(self.dtype, self.device) for i, lora in blocks.items()}
            logger.info(f"Loaded adapter {name!r} from {path} for blocks [{self.span_start}, {self.span_end})")

    def hosted_rows(self, name: str, blocks: BlockRange) -> list[BlockLora]:
        if name not in self.hosted:
            raise ProtocolError(
                f"adapter {name!r} is not hosted here (hosted: {sorted(self.hosted) or 'none'})", ErrorCode.SERVER_LIMIT
            )
        first = self.span_start + blocks.first
        return [self.hosted[name][first + i] for i in range(blocks.length)]

    # ---- requests ----

    def resolve(
        self, ref: TuningRef, extra: Sequence[torch.Tensor], blocks: BlockRange, peer_id: str, batch: int, seq: int
    ) -> Tuning:
        """The prompts and LoRA a request names, as tensors; `extra` are its tensors after the hidden states."""
        extra = list(extra)
        tuning = Tuning()
        if ref.deep_prompts:
            if not extra:
                raise ProtocolError("deep_prompts is set but the request has no prompts tensor")
            prompts = extra.pop(0)
            if (
                prompts.dim() != 3
                or prompts.shape[0] != blocks.length
                or prompts.shape[2] != self.spec.hidden_size
                or not 1 <= prompts.shape[1] <= seq
            ):
                raise ProtocolError(
                    f"prompts must be [{blocks.length}, prefix in 1..{seq}, {self.spec.hidden_size}], got {list(prompts.shape)}"
                )
            _check_values(prompts, "prompts")
            tuning.prompts = prompts.to(self.device, self.dtype)
        if ref.adapter is not None:
            tuning.lora = self.hosted_rows(ref.adapter, blocks)
        elif ref.lora is not None:
            tuning.lora, tuning.lora_targets, extra, tuning.lora_key = self._client_lora(ref.lora, extra, blocks, peer_id)
        if extra:
            raise ProtocolError(f"{len(extra)} unexpected tensor(s) in the request")
        return tuning

    def _client_lora(
        self, lora: LoraRef, extra: list[torch.Tensor], blocks: BlockRange, peer_id: str
    ) -> tuple[list[BlockLora], tuple[str, ...], list[torch.Tensor], tuple[str, str, int]]:
        first = self.span_start + blocks.first
        wanted = range(first, first + blocks.length)
        key = (peer_id, lora.id, lora.version)
        if not lora.weights:
            with self._lock:
                entry = self._clients.get(key)
                if entry is None or any(i not in entry.blocks for i in wanted):
                    raise ProtocolError(
                        f"LoRA {lora.id!r} version {lora.version} for blocks [{first}, {first + blocks.length}) "
                        f"is not cached here; send the weights",
                        ErrorCode.ADAPTER_NOT_CACHED,
                    )
                entry.last_used = time.monotonic()
                return [entry.blocks[i] for i in wanted], entry.targets, extra, key
        rank, scaling = lora.rank, lora.scaling
        if not 1 <= rank <= self.max_rank:
            raise ProtocolError(
                f"LoRA rank {rank} not in [1, {self.max_rank}] (server limit --max_lora_rank)", ErrorCode.SERVER_LIMIT
            )
        try:
            targets = canonical_targets(list(lora.targets), self.spec)
            shapes = wire_shapes(self.spec, rank, targets, blocks.length)
        except ValueError as e:
            raise ProtocolError(str(e)) from None
        if targets != lora.targets:
            raise ProtocolError(f"LoRA targets must be listed once each in the order {list(targets)}")
        if len(extra) < len(shapes):
            raise ProtocolError(f"LoRA weights: expected {len(shapes)} tensors, got {len(extra)}")
        tensors, extra = extra[: len(shapes)], extra[len(shapes) :]
        for i, (tensor, shape) in enumerate(zip(tensors, shapes)):
            if tuple(tensor.shape) != shape:
                raise ProtocolError(f"LoRA tensor {i} has shape {tuple(tensor.shape)}, expected {shape}")
            _check_values(tensor, f"LoRA tensor {i}")
        nbytes = sum(t.numel() for t in tensors) * 4
        if nbytes > self.max_bytes_per_peer:
            raise ProtocolError(
                f"LoRA weights of {nbytes} bytes exceed the server limit of {self.max_bytes_per_peer} "
                f"per client (--max_adapter_bytes)",
                ErrorCode.SERVER_LIMIT,
            )
        with self._lock:
            self._expire_locked()
            entry = self._clients.get(key)
            if entry is not None and (entry.rank, entry.scaling, entry.targets) != (rank, scaling, targets):
                raise ProtocolError(
                    f"LoRA {lora.id!r} version {lora.version} is already held with another rank, "
                    f"scaling or targets; a changed adapter needs a new version"
                )
            # older versions of this adapter are superseded, unless a session still runs with them; they go
            # only once the upload is accepted (a refused one changes nothing)
            superseded = [k for k, e in self._clients.items() if k[:2] == key[:2] and k != key and not e.sessions]
            freed = sum(self._clients[k].nbytes for k in superseded)
            replaced = sum(entry.blocks[i].nbytes for i in wanted if i in entry.blocks) if entry is not None else 0
            if self.held_bytes(peer_id) - freed - replaced + nbytes > self.max_bytes_per_peer:
                raise ProtocolError(
                    f"this client's LoRA weights and prompts would exceed {self.max_bytes_per_peer} "
                    f"bytes on this server (--max_adapter_bytes)",
                    ErrorCode.SERVER_LIMIT,
                )
            for old in superseded:
                del self._clients[old]
            received = from_wire([t.to(self.device, torch.float32) for t in tensors], targets, scaling, blocks.length)
            if entry is None:
                entry = self._clients[key] = _ClientEntry(rank, scaling, targets, {}, time.monotonic())
            entry.blocks.update(zip(wanted, received))
            entry.last_used = time.monotonic()
        return received, targets, extra, key

    def held_bytes(self, peer_id: str) -> int:
        """Bytes held for one client: its cached LoRA weights and its open sessions' deep prompts."""
        return sum(e.nbytes for k, e in self._clients.items() if k[0] == peer_id) + self._prompt_bytes.get(peer_id, 0)

    def pin(self, peer_id: str, tuning: Tuning) -> Callable[[], None]:
        """An inference session starts using `tuning` for its life: its client LoRA stays cached and its
        deep prompts count against the client's bytes. Returns the release to call when it closes."""
        prompt_bytes = 0 if tuning.prompts is None else tuning.prompts.numel() * tuning.prompts.element_size()
        with self._lock:
            if self.held_bytes(peer_id) + prompt_bytes > self.max_bytes_per_peer:
                raise ProtocolError(
                    f"this client's LoRA weights and prompts would exceed {self.max_bytes_per_peer} "
                    f"bytes on this server (--max_adapter_bytes)",
                    ErrorCode.SERVER_LIMIT,
                )
            self._prompt_bytes[peer_id] = self._prompt_bytes.get(peer_id, 0) + prompt_bytes
            entry = self._clients.get(tuning.lora_key) if tuning.lora_key is not None else None
            if entry is not None:
                entry.sessions += 1

        def release() -> None:
            with self._lock:
                left = self._prompt_bytes.get(peer_id, 0) - prompt_bytes
                if left > 0:
                    self._prompt_bytes[peer_id] = left
                else:
                    self._prompt_bytes.pop(peer_id, None)
                if entry is not None:
                    entry.sessions -= 1
                    entry.last_used = time.monotonic()

        return release

    def expire(self) -> None:
        with self._lock:
            self._expire_locked()

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for key in [k for k, e in self._clients.items() if not e.sessions and now - e.last_used > self.idle_timeout]:
            del self._clients[key]

    def clients(self) -> list[tuple[str, str, int]]:
        """(peer, adapter id, version) of every client LoRA held."""
        with self._lock:
            return list(self._clients)


def adapter_arg(item: str | Path) -> tuple[str, str]:
    """A --adapters item, "NAME=PATH" or "PATH" (named after its folder) -> (name, path)."""
    name, _, path = str(item).rpartition("=")
    name = name or Path(path).resolve().name
    if not 0 < len(name) <= MAX_ID_LENGTH:
        raise ValueError(f"adapter name {name!r} must have 1..{MAX_ID_LENGTH} characters")
    return name, path


def _check_values(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in WIRE_DTYPES.values():
        raise ProtocolError(f"{name} must be one of {sorted(WIRE_DTYPES)}, got {str(tensor.dtype).replace('torch.', '')}")
    if not all_finite(tensor):
        raise ProtocolError(f"{name} contains NaN or infinity")
