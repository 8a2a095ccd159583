"""BoundedStorage and NoCache: a node's local DHT storage, without the holes hivemind's leaves open.

hivemind's DHTLocalStorage, as a node of a swarm anyone can join uses it, has four problems; the
classes here replace it (and its cache) on every SwarmNode:

- **No bound per key.** A node answers a search with a key's whole dictionary in one message, and
  the daemon does not send a message over 4 MiB: a peer that signs a few thousand records under
  made-up identities (each valid, each its own entry) would make the key unreadable from every node
  that holds it. A new subkey is refused once the key holds MAX_KEY_BYTES; an entry already there may
  be refreshed (servers re-announce under the same subkey). dht/announce.py reads one key per
  request, so that a reply holds one key's dictionary.
- **A refused replay deletes the newer entry.** TimedStorage moves an entry's expiry to the time a
  store names *before* it refuses that store as older than what it holds: a replayed old record
  would make the server's current one vanish at the old record's expiration. Older and equal
  entries are refused here before hivemind sees them.
- **Searches write into storage.** A search starts from the node's own stored dictionary object and
  merges every reply into it, which would put other nodes' entries into this node's storage, past
  the budget and past these checks. get() hands out a copy.
- **The cache answers for the storage.** See NoCache.

What the budget leaves open (a full key turns new servers away until the flood expires) is in
docs/security.md.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

from hivemind.dht.routing import DHTID, BinaryDHTValue, Subkey
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.utils.timed_storage import DHTExpiration, TimedStorage, ValueWithExpiration, get_dht_time

logger = logging.getLogger(__name__)

MAX_KEY_BYTES = 3 * 1024**2  # subkeys and values under one key; a reply also carries peers, well under 1 MiB more
REFRESH_HEADROOM = 256 * 1024  # an entry already there may grow a little past MAX_KEY_BYTES when it is refreshed


def _entry_bytes(subkey: Subkey, value: BinaryDHTValue) -> int:
    return len(subkey) + len(value) if isinstance(subkey, (str, bytes)) else 64 + len(value)


def dictionary_bytes(entries: DictionaryDHTValue) -> int:
    return sum(_entry_bytes(subkey, value) for subkey, (value, _) in entries.items())


def copy_dictionary(entries: DictionaryDHTValue) -> DictionaryDHTValue:
    copy = DictionaryDHTValue(entries.maxsize)
    for subkey, (value, expiration_time) in entries.items():
        copy.store(subkey, value, expiration_time)
    copy.latest_expiration_time = entries.latest_expiration_time
    return copy


class BoundedStorage(DHTLocalStorage):
    def __init__(self, maxsize: Optional[int] = None, max_key_bytes: int = MAX_KEY_BYTES):
        super().__init__(maxsize=maxsize)
        self.max_key_bytes = max_key_bytes
        # per dictionary, as attributes: `size_bound`, at least its bytes (entries expire unseen, so it can
        # be more); `full_until`, before when no new subkey fits (the first expiry of one of its entries)

    @classmethod
    def replacing(cls, storage: DHTLocalStorage, **kwargs) -> BoundedStorage:
        """A BoundedStorage holding what `storage` holds (records stored while the node was joining)."""
        bounded = cls(maxsize=storage.maxsize, **kwargs)
        for key, (value, expiration_time) in storage.items():
            TimedStorage.store(bounded, key, value, expiration_time)
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
            if _entry_bytes(subkey, value) > self.max_key_bytes:
                return False
            entries = DictionaryDHTValue()
            entries.store(subkey, value, expiration_time)
            entries.size_bound = _entry_bytes(subkey, value)
            return TimedStorage.store(self, key, entries, expiration_time)
        previous = entries.get(subkey)
        if previous is not None and expiration_time <= previous.expiration_time:
            return False  # what hivemind would refuse, refused before it moves the newer entry's expiry
        if not self._fits(entries, subkey, value, previous):
            logger.debug(f"Refusing a DHT entry: key {key} would hold more than {self.max_key_bytes} bytes")
            return False
        if expiration_time > entries.latest_expiration_time:
            TimedStorage.store(self, key, entries, expiration_time)  # the key lives as long as its latest entry
        return entries.store(subkey, value, expiration_time)

    def _fits(self, entries: DictionaryDHTValue, subkey: Subkey, value: BinaryDHTValue,
              previous: Optional[ValueWithExpiration]) -> bool:  # fmt: skip
        """Whether the entry keeps the dictionary within budget, in O(1) except when the bound says it may not
        (then the bytes are counted again, and a full dictionary is not counted again before an entry expires)."""
        if previous is None and get_dht_time() < getattr(entries, "full_until", -math.inf):
            return False
        grows = _entry_bytes(subkey, value) - (0 if previous is None else _entry_bytes(subkey, previous.value))
        limit = self.max_key_bytes + (0 if previous is None else REFRESH_HEADROOM)
        bound = getattr(entries, "size_bound", None)
        if bound is None or bound + grows > limit:
            bound = dictionary_bytes(entries)
            if bound + grows > limit:
                entries.size_bound = bound
                first = entries.top()[1]
                if previous is None and first is not None:
                    entries.full_until = first.expiration_time
                return False
        entries.size_bound = bound + grows
        return True


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
