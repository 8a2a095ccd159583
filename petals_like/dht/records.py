"""The DHT record schema, in one place.

key    = "{dht_prefix}.{block_index}"  (one key per block of a model; many models share one swarm)
subkey = the server's peer id (base58)
value  = ServerInfo.to_record(), expiring unless re-announced

Readers validate every record (ServerInfo.from_record) and skip malformed ones with a log line.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from petals_like.data_structures import RemoteSpanInfo, ServerInfo, ServerState

logger = logging.getLogger(__name__)

_PREFIX_ALLOWED = re.compile(r"[^A-Za-z0-9_\-]")


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


def parse_block_entries(raw: Any, block_index: int) -> dict[str, ServerInfo]:
    """The {peer id: ServerInfo} of one block's DHT value; malformed entries are dropped with a warning.

    A record claiming a span that does not contain the block it was stored under is nonsense too.
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

