"""The only places that store to or read from the DHT: declare a server's blocks, read the swarm."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time

from petals_like.data_structures import ServerInfo
from petals_like.dht.identity import Identity, peer_id_of, signed_peer_id, split_owner_subkey
from petals_like.dht.records import MODELS_KEY, ModelInfo, block_key, parse_block_entries, parse_model_entries

logger = logging.getLogger(__name__)


async def declare_blocks(
    node: DHTNode,
    dht_prefix: str,
    block_indices: Sequence[int],
    info: ServerInfo,
    *,
    identity: Identity,
    expiration: float,
    model: Optional[ModelInfo] = None,
) -> bool:
    """Store `info` under each block's key, signed, with this server's peer id as the subkey; True if all
    stores took. With `model`, the model's entry in the swarm's list of models (MODELS_KEY) is refreshed too.
    """
    peer_id = node.peer_id.to_base58()
    expiration_time = get_dht_time() + expiration
    keys = [block_key(dht_prefix, i) for i in block_indices]
    values, subkeys = [info.to_record()] * len(keys), [identity.owner_subkey(peer_id)] * len(keys)
    if model is not None:
        keys, values = [*keys, MODELS_KEY], [*values, model.to_record()]
        subkeys = [*subkeys, identity.owner_subkey(f"{dht_prefix}@{peer_id}")]
    results = await node.store_many(keys, values, expiration_time, subkeys=subkeys, num_workers=len(keys))
    ok = all(results.values())
    if not ok:
        logger.debug(f"Some DHT stores for {dht_prefix} {info.state.name} failed: {results}")
    return ok


async def get_block_infos(
    node: DHTNode, dht_prefix: str, block_indices: Sequence[int], *, latest: bool = True, num_blocks: Optional[int] = None
) -> list[dict[str, ServerInfo]]:
    """For each block, the valid {peer id: ServerInfo} records found in the DHT (empty dict if none);
    with the model's num_blocks, records of spans past its end are dropped too."""
    keys = [block_key(dht_prefix, i) for i in block_indices]
    found = await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)
    return [parse_block_entries(_signed_entries(found.get(key), key), index, num_blocks)
            for key, index in zip(keys, block_indices)]


async def get_models(node: DHTNode, *, latest: bool = True) -> dict[str, ModelInfo]:
    """Every model announced in the swarm: {dht_prefix: ModelInfo}, by what most of its servers say."""
    found = await node.get(MODELS_KEY, latest=latest)
    signed = _signed_entries(found, MODELS_KEY)
    if signed is None:
        return {}
    # one entry per (model, server): the value most of a model's servers give wins over a stranger's
    votes: dict[str, Counter] = {}
    values: dict[tuple[str, str], Any] = {}
    for (prefix, _), value in signed.items():
        votes.setdefault(prefix, Counter())[repr(value)] += 1
        values.setdefault((prefix, repr(value)), value)
    chosen = {prefix: values[prefix, counter.most_common(1)[0][0]] for prefix, counter in votes.items()}
    return parse_model_entries(chosen)


def _signed_entries(raw: Any, key: str) -> Optional[dict]:
    """A DHT value's entries keyed by what their signed subkeys name: the peer id for block records,
    (dht_prefix, peer id) for the list of models. Unsigned entries, and entries signed by a key that is
    not the named peer's, are dropped."""
    if raw is None:
        return None
    entries = getattr(raw, "value", raw)
    if not isinstance(entries, Mapping):
        return entries  # parse_*_entries reports it
    result: dict = {}
    dropped = 0
    for subkey, entry in entries.items():
        parts = split_owner_subkey(subkey)
        if parts is not None:
            name, owner = parts
            if key != MODELS_KEY:
                if signed_peer_id(subkey) == name:
                    result[name] = entry
                    continue
            else:
                prefix, _, peer = name.rpartition("@")
                if prefix and peer_id_of(owner) == peer:
                    result[prefix, peer] = getattr(entry, "value", entry)
                    continue
        dropped += 1
    if dropped:
        logger.info(f"Ignoring {dropped} unsigned or foreign-signed record(s) under {key!r}")
    return result
