"""The only places that store to or read from the DHT: declare a server's blocks, read the swarm."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time

from petals_like.data_structures import ServerInfo
from petals_like.dht.records import MODELS_KEY, ModelInfo, block_key, parse_block_entries, parse_model_entries

logger = logging.getLogger(__name__)


async def declare_blocks(
    node: DHTNode,
    dht_prefix: str,
    block_indices: Sequence[int],
    info: ServerInfo,
    *,
    expiration: float,
    model: Optional[ModelInfo] = None,
) -> bool:
    """Store `info` under each block's key with this server's peer id as the subkey; True if all stores took.

    With `model`, the model's entry in the swarm's list of models (MODELS_KEY) is refreshed too.
    """
    peer_id = node.peer_id.to_base58()
    expiration_time = get_dht_time() + expiration
    keys = [block_key(dht_prefix, i) for i in block_indices]
    values, subkeys = [info.to_record()] * len(keys), [peer_id] * len(keys)
    if model is not None:
        keys, values, subkeys = [*keys, MODELS_KEY], [*values, model.to_record()], [*subkeys, dht_prefix]
    results = await node.store_many(keys, values, expiration_time, subkeys=subkeys, num_workers=len(keys))
    ok = all(results.values())
    if not ok:
        logger.debug(f"Some DHT stores for {dht_prefix} {info.state.name} failed: {results}")
    return ok


async def get_block_infos(
    node: DHTNode, dht_prefix: str, block_indices: Sequence[int], *, latest: bool = True
) -> list[dict[str, ServerInfo]]:
    """For each block, the valid {peer id: ServerInfo} records found in the DHT (empty dict if none)."""
    keys = [block_key(dht_prefix, i) for i in block_indices]
    found = await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)
    return [parse_block_entries(found.get(key), index) for key, index in zip(keys, block_indices)]


async def get_models(node: DHTNode, *, latest: bool = True) -> dict[str, ModelInfo]:
    """Every model announced in the swarm: the valid {dht_prefix: ModelInfo} entries of MODELS_KEY."""
    found = await node.get(MODELS_KEY, latest=latest)
    return parse_model_entries(found)
