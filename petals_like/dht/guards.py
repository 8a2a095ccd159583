"""What every SwarmNode changes in hivemind's DHTProtocol, so that one hostile node cannot hide, erase or
outlast the records of others (docs/security.md). install() does it all, before the node serves:

- storage and cache: BoundedStorage and NoCache (dht/storage.py);
- a dictionary that a node is sent, to store or in a reply, loses the entries that fail the validators,
  and keeps the rest: hivemind drops the whole dictionary for one bad entry, so a stranger's entry
  that one node accepted and another refuses (an expiration near the limit, seen by a clock a little
  behind) would hide every record that node sent. Its `maxsize` is the sender's choice and ignored;
- a reply is dated by its latest entry, not by the date the replying node gives it: hivemind ends a
  search for the latest value as soon as a reply is dated that late (never, for reads with
  latest=True, unless a reply says "infinity"), so one node dating its own entries infinity would be
  the only node a reader heard. An empty reply is no answer;
- one key per request: hivemind asks a node for several keys in one request (stores look for the
  nodes to store at this way too), and the reply, which holds every key's whole dictionary, must fit
  the daemon's 4 MiB message limit.
"""

from __future__ import annotations

import asyncio
import math
from typing import Awaitable, Callable, Collection, Optional

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import ValueWithExpiration

from petals_like.dht.storage import BoundedStorage, NoCache

CallFind = Callable[[PeerID, Collection[DHTID]], Awaitable[Optional[dict]]]


def install(protocol: DHTProtocol) -> None:
    """Nothing may await between DHTNode.create() returning and this call: the node would serve meanwhile."""
    protocol.storage, protocol.cache = BoundedStorage.replacing(protocol.storage), NoCache()
    protocol._validate_dictionary = lambda key, entries: _keep_valid_entries(protocol, key, entries)
    protocol.call_find = _one_key_per_request(_dated_by_entries(protocol.call_find))


def _keep_valid_entries(protocol: DHTProtocol, key_bytes: bytes, entries: DictionaryDHTValue) -> bool:
    """hivemind's _validate_dictionary, keeping the valid entries instead of refusing them all for one."""
    entries.maxsize = math.inf
    validator, refused = protocol.record_validator, []
    with entries.freeze():
        for subkey, (value, expiration_time) in entries.items():
            try:
                record = DHTRecord(key_bytes, protocol.serializer.dumps(subkey), value, expiration_time)
                valid = validator is None or validator.validate(record)
            except Exception:  # whatever a stranger's types make the validators raise
                valid = False
            if not valid:
                refused.append(subkey)
    for subkey in refused:
        del entries[subkey]
    return True


def _dated_by_entries(call_find: CallFind) -> CallFind:
    async def call(peer: PeerID, keys: Collection[DHTID]) -> Optional[dict]:
        found = await call_find(peer, keys)
        if found is None:
            return None
        return {key: (_dated(value), nearest) for key, (value, nearest) in found.items()}

    return call


def _dated(found: Optional[ValueWithExpiration]) -> Optional[ValueWithExpiration]:
    """A reply's dictionary, dated by its latest entry. Its entries and types passed _keep_valid_entries."""
    if found is None or not isinstance(found.value, DictionaryDHTValue):
        return found
    latest = max((item.expiration_time for item in found.value.data.values()), default=None)
    if latest is None:
        return None
    found.value.latest_expiration_time = latest
    return ValueWithExpiration(found.value, latest)


def _one_key_per_request(call_find: CallFind) -> CallFind:
    async def call(peer: PeerID, keys: Collection[DHTID]) -> Optional[dict]:
        keys = list(keys)
        if len(keys) <= 1:
            return await call_find(peer, keys)
        replies = await asyncio.gather(*(call_find(peer, [key]) for key in keys))
        if all(reply is None for reply in replies):
            return None
        found = {}
        for key, reply in zip(keys, replies):
            found.update(reply if reply is not None else {key: (None, {})})
        return found

    return call
