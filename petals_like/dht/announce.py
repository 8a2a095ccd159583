"""The only places that store to or read from the DHT: declare a server's blocks, read the swarm."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from petals_like.data_structures import ServerInfo
from petals_like.dht.identity import Identity, signed_peer_id
from petals_like.dht.records import MODELS_KEY, ModelInfo, block_key, model_record, parse_block_entries, parse_model_record

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
    values = [info.to_record()] * len(keys)
    if model is not None:
        keys, values = [*keys, MODELS_KEY], [*values, model_record(dht_prefix, model)]
    subkeys = [identity.owner_subkey(peer_id)] * len(keys)
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
    return [
        parse_block_entries(signed_entries(found.get(key), key), index, num_blocks) for key, index in zip(keys, block_indices)
    ]


async def get_models(node: DHTNode, *, latest: bool = True) -> dict[str, ModelInfo]:
    """Every model announced in the swarm: {dht_prefix: ModelInfo}, by what most of its servers say."""
    votes: dict[str, Counter] = {}
    for peer_id, value in signed_entries(await node.get(MODELS_KEY, latest=latest), MODELS_KEY).items():
        try:
            prefix, model = parse_model_record(value)
        except ValueError as e:
            logger.warning(f"Ignoring the model record of {peer_id[-6:]}: {e}")
            continue
        votes.setdefault(prefix, Counter())[model] += 1  # a stranger's lie about a model is outvoted by its servers
    return {prefix: counter.most_common(1)[0][0] for prefix, counter in votes.items()}


def signed_entries(found: Optional[ValueWithExpiration], key: str) -> dict[str, Any]:
    """{peer id: value} of the entries of a DHT value whose subkeys are signed by the peer they name.

    The nodes that returned the value checked this already (records.SwarmValidator), but it is
    cheap to hold to here too: a value without subkeys (a plain value, whatever its shape) yields nothing,
    and so does an entry under any other subkey."""
    if found is None:
        return {}
    entries = found.value
    if not isinstance(entries, Mapping):
        logger.info(f"Ignoring a plain value under {key!r}: the swarm's records are all signed dictionary entries")
        return {}
    result, dropped = {}, 0
    for subkey, entry in entries.items():
        peer_id = signed_peer_id(subkey)
        if peer_id is None or not isinstance(entry, ValueWithExpiration):  # a plain dict's items are not entries
            dropped += 1
        else:
            result[peer_id] = entry.value
    if dropped:
        logger.info(f"Ignoring {dropped} unsigned or foreign-signed record(s) under {key!r}")
    return result
