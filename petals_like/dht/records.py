"""The DHT record schema, in one place.

key    = "{dht_prefix}.{block_index}"  (one key per block of a model; many models share one swarm)
subkey = "{peer id}[owner:{public key}]": the server's peer id, signed (dht/identity.py)
value  = ServerInfo.to_record(), expiring unless re-announced

The list of models in the swarm, so that a reader (the dashboard) can find every model:
key    = MODELS_KEY
subkey = "{dht_prefix}@{peer id}[owner:{public key}]": one entry per model and server, signed
value  = ModelInfo.to_record(), stored by each of its servers with their block records

Readers keep only records signed by the peer they name (announce._signed_entries), validate every
record (ServerInfo.from_record, ModelInfo.from_record) and skip malformed ones with a log line.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from petals_like.data_structures import MAX_BLOCKS, MAX_TEXT, RemoteSpanInfo, ServerInfo, ServerState
from petals_like.dht.identity import split_owner_subkey

logger = logging.getLogger(__name__)

_PREFIX_ALLOWED = re.compile(r"[^A-Za-z0-9_\-]")
MODELS_KEY = "petals_like.models"  # not "{prefix}.{int}", so it never meets a block key
MAX_PREFIX = 128  # characters in a dht_prefix read from a record


def default_dht_prefix(name_or_path: str | Path) -> str:
    """A model's name in the swarm: the last component of its hub name or folder, made key-safe.

    "meta-llama/Llama-2-7b-hf" and a local copy in ".../Llama-2-7b-hf/" meet under the same prefix.
    """
    name = str(name_or_path).rstrip("/").split("/")[-1]
    prefix = _PREFIX_ALLOWED.sub("-", name)
    if not prefix:
        raise ValueError(f"cannot derive a dht_prefix from {name_or_path!r}; pass one explicitly")
    return prefix


def block_key(dht_prefix: str, block_index: int) -> str:
    return f"{dht_prefix}.{block_index}"


def parse_block_entries(raw: Any, block_index: int, num_blocks: Optional[int] = None) -> dict[str, ServerInfo]:
    """The {peer id: ServerInfo} of one block's DHT value; malformed entries are dropped with a warning.

    A record claiming a span that does not contain the block it was stored under, or (given the model's
    num_blocks) that reaches past the model's last block, is nonsense too.
    """
    result: dict[str, ServerInfo] = {}
    if raw is None:
        return result
    entries = getattr(raw, "value", raw)
    if not isinstance(entries, Mapping):
        logger.warning(f"Ignoring DHT value of block {block_index}: not a mapping of servers")
        return result
    for peer_id, entry in entries.items():
        value = getattr(entry, "value", entry)
        try:
            if not isinstance(peer_id, str) or not 0 < len(peer_id) <= 128:
                raise ValueError("subkey is not a peer id")
            info = ServerInfo.from_record(value)
            if not info.start_block <= block_index < info.end_block:
                raise ValueError(f"span {info.start_block}:{info.end_block} does not contain block {block_index}")
            if num_blocks is not None and info.end_block > num_blocks:
                raise ValueError(f"span {info.start_block}:{info.end_block} reaches past the model's {num_blocks} blocks")
        except ValueError as e:
            logger.warning(f"Ignoring record of {str(peer_id)[:16]!r} for block {block_index}: {e}")
            continue
        result[peer_id] = info
    return result


def compute_spans(
    block_infos: Iterable[Mapping[str, ServerInfo]],
    start: int = 0,
    *,
    min_state: ServerState = ServerState.ONLINE,
) -> dict[str, RemoteSpanInfo]:
    """Per server, the contiguous run of blocks it is seen serving, clipped to what the records show.

    block_infos[i] lists the servers of block start+i. A server whose records are missing for some
    blocks (not yet replicated, expired) is credited only with the run that contains its first seen block.
    """
    spans: dict[str, RemoteSpanInfo] = {}
    for offset, servers in enumerate(block_infos):
        index = start + offset
        for peer_id, info in servers.items():
            if info.state < min_state:
                continue
            span = spans.get(peer_id)
            if span is None:
                spans[peer_id] = RemoteSpanInfo(peer_id, index, index + 1, info)
            elif span.end == index:
                spans[peer_id] = RemoteSpanInfo(peer_id, span.start, index + 1, info)
    return spans


def check_dht_prefix(prefix: Any) -> str:
    """A dht_prefix read from a record: a short printable string without spaces (it becomes part of keys)."""
    if not isinstance(prefix, str) or not 0 < len(prefix) <= MAX_PREFIX:
        raise ValueError(f"dht_prefix must be a string of 1 to {MAX_PREFIX} characters")
    if not prefix.isprintable() or any(c.isspace() for c in prefix):
        raise ValueError("dht_prefix must be printable and without spaces")
    return prefix


@dataclass(frozen=True)
class ModelInfo:
    """What a server announces about the model it serves part of (one record per model)."""

    num_blocks: int  # transformer blocks of the whole model
    name: str = ""  # hub name or checkpoint folder name, for people reading the dashboard

    def to_record(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "name": self.name}

    @classmethod
    def from_record(cls, raw: Any) -> ModelInfo:
        """Validate a record read from the DHT; unknown fields are dropped so versions can mix."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"model info must be a mapping, got {type(raw).__name__}")
        num_blocks = raw.get("num_blocks")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 0 < num_blocks <= MAX_BLOCKS:
            raise ValueError(f"num_blocks={num_blocks!r} is not in [1, {MAX_BLOCKS}]")
        name = raw.get("name", "")
        if not isinstance(name, str) or len(name) > MAX_TEXT:
            raise ValueError(f"name must be a string of at most {MAX_TEXT} characters")
        return cls(num_blocks=num_blocks, name=name)


def parse_model_entries(raw: Any) -> dict[str, ModelInfo]:
    """The {dht_prefix: ModelInfo} of the MODELS_KEY value; malformed entries are dropped with a warning."""
    result: dict[str, ModelInfo] = {}
    if raw is None:
        return result
    entries = getattr(raw, "value", raw)
    if not isinstance(entries, Mapping):
        logger.warning("Ignoring the DHT list of models: not a mapping of models")
        return result
    for prefix, entry in entries.items():
        value = getattr(entry, "value", entry)
        try:
            result[check_dht_prefix(prefix)] = ModelInfo.from_record(value)
        except ValueError as e:
            logger.warning(f"Ignoring model record {str(prefix)[:32]!r}: {e}")
    return result


class RecordSchemaValidator(RecordValidatorBase):
    """Every node's check of a signed record of this project, when asked to store it and when it is
    returned by a search: its value must parse as a ServerInfo (block records) or a ModelInfo (the list
    of models), so hostile values do not even take space in honest nodes' storage. Readers check again
    (parse_block_entries), with what only they know: the block it is stored under, the model's size.
    Runs after hivemind's signature validator, which has stripped the signature by then."""

    def validate(self, record: DHTRecord) -> bool:
        try:
            parts = split_owner_subkey(MSGPackSerializer.loads(record.subkey))
        except Exception:
            return True  # not a subkey of ours: unsigned records are ignored by readers anyway
        if parts is None:
            return True
        try:
            value = MSGPackSerializer.loads(record.value)
            prefix, at, _ = parts[0].rpartition("@")
            if at:
                check_dht_prefix(prefix)
                ModelInfo.from_record(value)
            else:
                ServerInfo.from_record(value)
        except Exception as e:
            logger.info(f"Refusing a DHT record under {parts[0][:64]!r}: {e}")
            return False
        return True
