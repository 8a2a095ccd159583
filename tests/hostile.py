"""A hostile DHT node for tests: what a peer that runs a modified node can send to everybody else.

It joins a swarm as an ordinary SwarmNode, then talks to other nodes' rpc_store and rpc_find directly
(hivemind's DHTProtocol.call_store / call_find), so that its own validators never see what it sends:
plain values, subkeys of any type, records signed by any key it holds, replays of records it read,
any expiration. Each store reports what every target node answered, so that a test can check that
each validating node refused it by itself.
"""

from __future__ import annotations

import functools
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey

from petals_like.dht.identity import peer_id_of
from petals_like.dht.node import SwarmNode

LOCALHOST = ["/ip4/127.0.0.1/tcp/0"]
NO_SUBKEY = object()  # store a plain value (hivemind's "regular value"), as opposed to a subkey of None


@dataclass
class Key:
    """An RSA key the attacker holds, and the records it signs (as hivemind's validator would)."""

    private_key: RSAPrivateKey

    @functools.cached_property
    def public_key(self) -> str:
        return self.private_key.get_public_key().to_bytes().decode()

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    def subkey(self, name: Optional[str] = None) -> str:
        """`name` (default: this key's own peer id) under this key's owner mark."""
        return f"{self.peer_id if name is None else name}[owner:{self.public_key}]"

    def sign(self, key: str, subkey: Any, value: Any, expiration: float) -> bytes:
        """The stored bytes of `value` under (key, subkey), signed with this key for this expiration."""
        record = DHTRecord(
            DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration
        )
        return RSASignatureValidator(self.private_key).sign_value(record)


def _fake_server(_: int, records: Mapping[str, Any], expiration: float) -> tuple[Key, list[tuple[str, str, bytes, float]]]:
    key = Key(RSAPrivateKey())
    return key, [(k, key.subkey(), key.sign(k, key.subkey(), value, expiration), expiration) for k, value in records.items()]


def make_fake_servers(count: int, records: Mapping[str, Any], expiration: float) -> list[tuple[Key, list[tuple]]]:
    """`count` new identities, each with its own signed entry of records[key] under every key: entries for
    HostileNode.store_many. A key costs ~50 ms to make: both cores make them."""
    with ProcessPoolExecutor(2) as pool:
        return list(
            pool.map(
                functools.partial(_fake_server, records=records, expiration=expiration),
                range(count),
                chunksize=max(1, count // 8),
            )
        )


class HostileNode:
    def __init__(self, initial_peers: Sequence[str]):
        self.node = SwarmNode(initial_peers, host_maddrs=LOCALHOST, name="hostile")
        self.key = Key(self.node.identity.private_key)  # its own identity, as a server's would be

    def store(
        self,
        peers: Sequence[str],
        key: str,
        subkey: Any,
        value: Any,
        expiration: float,
        *,
        raw: bool = False,
        in_cache: bool = False,
    ) -> dict[str, Optional[list[bool]]]:
        """Ask each peer to store one entry; {peer: its answer (None: no answer)}. `value` is msgpack-encoded
        unless `raw` (bytes signed by Key.sign, or a DictionaryDHTValue sent whole)."""
        value = value if raw else MSGPackSerializer.dumps(value)
        return self.store_many(peers, [(key, subkey, value, expiration)], in_cache=in_cache)

    def store_many(
        self, peers: Sequence[str], entries: Sequence[tuple[str, Any, Any, float]], *, in_cache: bool = False
    ) -> dict[str, Optional[list[bool]]]:
        """Ask each peer to store (key, subkey, value bytes, expiration) entries in one request; `in_cache`: in
        the cache that hivemind keeps beside each node's storage, as nodes do with what their searches found."""
        keys = [DHTID.generate(source=key) for key, *_ in entries]
        subkeys = [None if subkey is NO_SUBKEY else subkey for _, subkey, _, _ in entries]
        for _, subkey, value, _ in entries:
            if subkey is None and not isinstance(value, DictionaryDHTValue):
                raise ValueError("pass NO_SUBKEY for a plain value (hivemind reserves None)")
        values = [value for _, _, value, _ in entries]
        expirations = [expiration for *_, expiration in entries]

        async def send() -> dict[str, Optional[list[bool]]]:
            protocol = self.node.dht.protocol
            answers = {}
            for peer in peers:
                answer = await protocol.call_store(
                    PeerID.from_base58(peer), keys, values, expirations, subkeys=subkeys, in_cache=[in_cache] * len(keys)
                )
                answers[peer] = None if answer is None else list(answer)
            return answers

        return self.node.run(send(), timeout=120)

    def plant(self, key: str, subkey: Any, value: Any, expiration: float) -> None:
        """Put an entry (or, with NO_SUBKEY, a plain value or a whole DictionaryDHTValue) into this node's own
        storage, unchecked, for it to serve to every reader that asks. From the first call on, this node
        runs hivemind's storage as it comes and no validators: it accepts anything it is asked to store."""
        protocol = self.node.dht.protocol
        if protocol.record_validator is not None:
            protocol.record_validator, protocol.storage = None, DHTLocalStorage()
        storage, key_id = protocol.storage, DHTID.generate(source=key)
        if isinstance(value, DictionaryDHTValue):  # a whole dictionary, dated as the caller likes, replacing any
            assert subkey is NO_SUBKEY
            del storage[key_id]
            assert storage.store(key_id, value, expiration)
            return
        value = value if isinstance(value, bytes) else MSGPackSerializer.dumps(value)
        if subkey is NO_SUBKEY:
            assert storage.store(key_id, value, expiration)
        else:
            assert storage.store_subkey(key_id, subkey, value, expiration)

    def read_signed(self, peer: str, key: str) -> dict[Any, tuple[bytes, float]]:
        """The entries one node holds under `key`, as stored (signed bytes and expiration): what a replay sends."""

        async def find() -> dict[Any, tuple[bytes, float]]:
            key_id = DHTID.generate(source=key)
            found = await self.node.dht.protocol.call_find(PeerID.from_base58(peer), [key_id])
            value = None if found is None else found[key_id][0]
            if value is None or not isinstance(value.value, DictionaryDHTValue):
                return {}
            return {subkey: (item.value, item.expiration_time) for subkey, item in value.value.items()}

        return self.node.run(find(), timeout=60)

    def shutdown(self) -> None:
        self.node.shutdown()
