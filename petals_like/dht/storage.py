"""BoundedStorage: hivemind's local DHT storage with a byte budget for each key's dictionary.

hivemind lets a key's dictionary grow without limit, and a node answers a search with a key's whole
dictionary in one message. A message over the daemon's limit (4 MiB) is not sent at all: a peer that
signs a few thousand records under its own made-up identities (each valid, each its own entry) would
make that key unreadable from every node that holds it, taking the block out of the swarm. So a new
subkey is refused once the key holds MAX_KEY_BYTES; an entry already there may always be refreshed
(servers re-announce under the same subkey), and dht/announce.py reads one key per request, so that
a reply holds one key's dictionary. What the budget leaves open (a full key turns new servers away
until the flood expires) is in docs/security.md.
"""

from __future__ import annotations

import logging
from typing import Optional

from hivemind.dht.routing import DHTID, BinaryDHTValue, Subkey
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.utils.timed_storage import DHTExpiration

logger = logging.getLogger(__name__)

MAX_KEY_BYTES = 3 * 1024**2  # subkeys and values under one key; a reply also carries peers, well under 1 MiB more
REFRESH_HEADROOM = 256 * 1024  # an entry already there may grow a little past MAX_KEY_BYTES when it is refreshed


def _entry_bytes(subkey: Subkey, value: BinaryDHTValue) -> int:
    return len(subkey) + len(value) if isinstance(subkey, (str, bytes)) else 64 + len(value)


def dictionary_bytes(entries: DictionaryDHTValue) -> int:
    return sum(_entry_bytes(subkey, value) for subkey, (value, _) in entries.items())


class BoundedStorage(DHTLocalStorage):
    def __init__(self, maxsize: Optional[int] = None, max_key_bytes: int = MAX_KEY_BYTES):
        super().__init__(maxsize=maxsize)
        self.max_key_bytes = max_key_bytes

    @classmethod
    def replacing(cls, storage: DHTLocalStorage, **kwargs) -> BoundedStorage:
        """A BoundedStorage holding what `storage` holds (records stored while the node was joining)."""
        bounded = cls(maxsize=storage.maxsize, **kwargs)
        for key, (value, expiration_time) in storage.items():
            bounded.store(key, value, expiration_time)
        return bounded

    def store(self, key: DHTID, value, expiration_time: DHTExpiration, subkey: Optional[Subkey] = None) -> bool:
        """A whole dictionary (a node caches what its searches found, merged from several nodes) is kept only
        within the budget: this node would answer searches with it."""
        if subkey is None and isinstance(value, DictionaryDHTValue) and dictionary_bytes(value) > self.max_key_bytes:
            logger.debug(f"Not keeping a dictionary of more than {self.max_key_bytes} bytes under {key}")
            return False
        return super().store(key, value, expiration_time, subkey=subkey)

    def store_subkey(self, key: DHTID, subkey: Subkey, value: BinaryDHTValue, expiration_time: DHTExpiration) -> bool:
        found = self.get(key)
        entries = found.value if found is not None else None
        if isinstance(entries, DictionaryDHTValue):
            previous = entries.get(subkey)
            total = dictionary_bytes(entries) + _entry_bytes(subkey, value)
            if previous is not None:
                total -= _entry_bytes(subkey, previous.value)
            if total > self.max_key_bytes + (0 if previous is None else REFRESH_HEADROOM):
                logger.debug(f"Refusing a DHT entry: key {key} would hold more than {self.max_key_bytes} bytes")
                return False
        return super().store_subkey(key, subkey, value, expiration_time)
