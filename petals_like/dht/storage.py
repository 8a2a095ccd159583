"""BoundedStorage and NoCache: a node's local DHT storage, without the holes hivemind's leaves open.

hivemind's DHTLocalStorage, as a node of a swarm anyone can join uses it, has these problems; the
classes here replace it (and its cache) on every SwarmNode (dht/guards.py):

- **No bounds.** A node answers a search with a key's whole dictionary in one message, and the
  daemon does not send a message over 4 MiB: a peer that signs a few thousand records under made-up
  identities (each valid, each its own entry) would make the key unreadable from every node that
  holds it. And a node stores whatever keys it is sent, as many as it is sent, for up to an hour
  each. A new subkey is refused once its key holds MAX_KEY_BYTES, or the node MAX_NODE_BYTES; an
  entry already there may be refreshed (servers re-announce under the same subkey).
- **A refused replay deletes the newer entry.** TimedStorage moves an entry's expiry to the time a
  store names *before* it refuses that store as older than what it holds: a replayed old record
  would make the server's current one vanish at the old record's expiration. Older and equal
  entries are refused here before hivemind sees them.
- **Searches write into storage.** A search starts from the node's own stored dictionary object and
  merges every reply into it, which would put other nodes' entries into this node's storage, past
  the bounds and past these checks. get() hands out a copy.
- **The cache answers for the storage.** See NoCache.

The bounds are checked in O(1) per store: each dictionary, and the node, keep an upper bound of
their bytes (entries expire unseen), counted again exactly only when a store would pass a limit; a
key (or node) found full is not counted again before one of its entries expires. What the bounds
leave open (a full key or node turns new records away until the flood expires) is in
docs/security.md.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

from hivemind.dht.routing import DHTID, BinaryDHTValue, Subkey
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.utils import timed_storage
from hivemind.utils.timed_storage import DHTExpiration, TimedStorage, ValueWithExpiration

logger = logging.getLogger(__name__)

MAX_KEY_BYTES = 3 * 1024**2  # subkeys and values under one key; a reply also carries peers, well under 1 MiB more
MAX_NODE_BYTES = 512 * 1024**2  # all keys of one node: ~400,000 records of ~1.2 KB
REFRESH_HEADROOM = 256 * 1024  # an entry already there may grow a little past the limits when it is refreshed


def _entry_bytes(subkey: Subkey, value: BinaryDHTValue) -> int:
    return len(subkey) + len(value) if isinstance(subkey, (str, bytes)) else 64 + len(value)


def dictionary_bytes(entries: DictionaryDHTValue) -> int:
    return sum(_entry_bytes(subkey, value) for subkey, (value, _) in entries.items())


def copy_dictionary(entries: DictionaryDHTValue) -> DictionaryDHTValue:
    """An independent copy, made by copying TimedStorage's containers (10 ms -> 0.1 ms for a full key)."""
    copy = DictionaryDHTValue(entries.maxsize)
    copy.data, copy.key_to_heap = dict(entries.data), dict(entries.key_to_heap)
    copy.expiration_heap = list(entries.expiration_heap)
    copy.latest_expiration_time = entries.latest_expiration_time
    return copy


class _Budget:
    """An upper bound of some bytes, counted exactly (recount()) only when a store would pass the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.bound = 0
        self.full_until = -math.inf  # before then, no new entry fits (the first expiry of an entry)

    def admits(self, grows: int, refresh: bool, recount, first_expiry) -> bool:
        if not refresh and timed_storage.get_dht_time() < self.full_until:  # hivemind's clock, looked up each time
            return False
        limit = self.limit + (REFRESH_HEADROOM if refresh else 0)
        if self.bound + grows > limit:
            self.bound = recount()
            if self.bound + grows > limit:
                if not refresh:
                    self.full_until = first_expiry()
                return False
        return True


class BoundedStorage(DHTLocalStorage):
    def __init__(self, maxsize: Optional[int] = None, max_key_bytes: int = MAX_KEY_BYTES, max_node_bytes: int = MAX_NODE_BYTES):
        super().__init__(maxsize=maxsize)
        self.max_key_bytes = max_key_bytes
        self.node_budget = _Budget(max_node_bytes)

    @classmethod
    def replacing(cls, storage: DHTLocalStorage, **kwargs) -> BoundedStorage:
        """A BoundedStorage holding what `storage` holds (records stored while the node was joining, by
        hivemind's rules), each entry stored again by these."""
        bounded = cls(maxsize=storage.maxsize, **kwargs)
        for key, (value, _) in storage.items():
            if isinstance(value, DictionaryDHTValue):
                for subkey, (entry, expiration_time) in value.items():
                    bounded.store_subkey(key, subkey, entry, expiration_time)
        return bounded

    def get(self, key: DHTID) -> Optional[ValueWithExpiration]:
        found = super().get(key)
        if found is None or not isinstance(found.value, DictionaryDHTValue):
            return found
        return ValueWithExpiration(copy_dictionary(found.value), found.expiration_time)

    def store_subkey(self, key: DHTID, subkey: Subkey, value: BinaryDHTValue, expiration_time: DHTExpiration) -> bool:
        """hivemind's store_subkey (a new dictionary, an entry added to one, a plain value replaced by one when
        it expires earlier), on the stored dictionary itself, with the checks of the module docstring."""
        if not math.isfinite(expiration_time):
            return False
        found = super().get(key)  # the stored value itself, not get()'s copy
        entries = None if found is None else found.value
        if not isinstance(entries, DictionaryDHTValue):
            if found is not None and expiration_time <= found.expiration_time:
                return False
            entries = DictionaryDHTValue()
            entries.key_budget = _Budget(self.max_key_bytes)
            previous = None
        else:
            previous = entries.get(subkey)
            if previous is not None and expiration_time <= previous.expiration_time:
                return False  # what hivemind would refuse, refused before it moves the newer entry's expiry
        grows = _entry_bytes(subkey, value) - (0 if previous is None else _entry_bytes(subkey, previous.value))
        if not self._admits(entries, grows, refresh=previous is not None):
            logger.debug(f"Refusing a DHT entry under {key}: the key or this node is full")
            return False
        if found is None or entries is not found.value or expiration_time > entries.latest_expiration_time:
            TimedStorage.store(self, key, entries, expiration_time)  # the key lives as long as its latest entry
        return entries.store(subkey, value, expiration_time)

    def _admits(self, entries: DictionaryDHTValue, grows: int, *, refresh: bool) -> bool:
        key_budget = getattr(entries, "key_budget", None)
        if key_budget is None:  # a dictionary stored before this class took over
            entries.key_budget = key_budget = _Budget(self.max_key_bytes)
            key_budget.bound = dictionary_bytes(entries)
        if not key_budget.admits(grows, refresh, lambda: dictionary_bytes(entries), lambda: _first_expiry(entries)):
            return False
        if not self.node_budget.admits(grows, refresh, self._node_bytes, self._first_expiry):
            return False
        key_budget.bound += grows
        self.node_budget.bound += grows
        return True

    def _node_bytes(self) -> int:
        total = 0
        for _, (value, _) in TimedStorage.items(self):
            if isinstance(value, DictionaryDHTValue):
                key_budget = getattr(value, "key_budget", None)
                size = dictionary_bytes(value)
                if key_budget is not None:
                    key_budget.bound = size
                total += size
            else:
                total += len(value)
        return total

    def _first_expiry(self) -> float:
        return min(
            (_first_expiry(value) for _, (value, _) in TimedStorage.items(self) if isinstance(value, DictionaryDHTValue)),
            default=-math.inf,
        )


def _first_expiry(entries: DictionaryDHTValue) -> float:
    first = entries.top()[1]
    return -math.inf if first is None else first.expiration_time


class NoCache(DHTLocalStorage):
    """In place of the cache hivemind keeps beside a node's storage: it keeps nothing.

    A node answers a search from its cache instead of its storage whenever the cached copy of a key
    expires later. Anyone may store into other nodes' caches, and every node caches what its own
    searches found: one valid entry of a stranger's own, expiring an hour ahead, would make nodes
    answer with that entry alone, or with an old copy of a key whose real records have expired since,
    for an hour. The project's reads ask the nodes that store a key every time (latest=True), so a cache
    would save them nothing."""

    def store(self, *args, **kwargs) -> bool:
        return False

    def store_subkey(self, *args, **kwargs) -> bool:
        return False
