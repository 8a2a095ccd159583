"""Peer identities that sign DHT records, so that only a peer can write the records that name it.

Every node runs its libp2p daemon with an RSA identity whose key also signs DHT records (hivemind's
RSASignatureValidator, registered on every node, rejects a record under an "[owner:KEY]" subkey
unless KEY signed it). Every record of the project uses the subkey "{peer id}[owner:KEY]", and a
record counts only if the peer id is the hash of KEY (libp2p's peer id of an RSA key): nodes refuse
to store anything else (dht/records.py) and readers drop anything else they are sent. A stranger can
sign records with its own key, but only under its own peer id: it cannot speak for another server,
and it gets one entry per key for each identity it makes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from typing import Optional

import base58
import multihash
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

_OWNER = re.compile(r"^(?P<name>[^\[\]]+)\[owner:(?P<key>[^\[\]]+)\]$")
MAX_SUBKEY = 1024  # characters: a name plus an RSA-2048 key in OpenSSH format is ~420
RSA_BITS = (2048, 4096)  # key sizes accepted: libp2p's minimum, and a bound on the cost of checking a signature


class Identity:
    """The RSA key of one node: the file its p2p daemon reads, and the key that signs its records."""

    def __init__(self, identity_path: Optional[str] = None):
        """identity_path: an RSA identity file (created there if missing); None = a fresh one for this run."""
        self._tmpdir = None
        self.fresh = identity_path is None or not os.path.isfile(identity_path)
        if identity_path is None:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="petals_like_identity_")
            identity_path = os.path.join(self._tmpdir.name, "identity.key")
        if not os.path.isfile(identity_path):
            P2P.generate_identity(identity_path)
        self.path = identity_path
        with open(identity_path, "rb") as f:
            key = crypto_pb2.PrivateKey.FromString(f.read())
        if key.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError(
                f"{identity_path} holds a {crypto_pb2.KeyType.Name(key.key_type)} key; records are signed "
                f"with RSA identities (delete the file to have a new one made)"
            )
        self.private_key = RSAPrivateKey.__new__(RSAPrivateKey)
        self.private_key._private_key = serialization.load_der_private_key(key.data, password=None)
        self.public_key = self.private_key.get_public_key().to_bytes().decode()

    def owner_subkey(self, name: str) -> str:
        """`name` as a subkey that only this identity can write."""
        return f"{name}[owner:{self.public_key}]"

    def close(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def split_owner_subkey(subkey: object) -> Optional[tuple[str, str]]:
    """(name, owner key) of a signed subkey; None for anything else."""
    if not isinstance(subkey, str) or len(subkey) > MAX_SUBKEY:
        return None
    match = _OWNER.match(subkey)
    return None if match is None else (match["name"], match["key"])


@functools.lru_cache(maxsize=4096)
def peer_id_of(public_key: str) -> Optional[str]:
    """libp2p's peer id (base58) of an RSA public key in OpenSSH format; None if it is not one, or if
    its size is outside RSA_BITS."""
    try:
        key = serialization.load_ssh_public_key(public_key.encode())
        if not isinstance(key, rsa.RSAPublicKey) or not RSA_BITS[0] <= key.key_size <= RSA_BITS[1]:
            return None
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError, UnicodeError, UnsupportedAlgorithm):
        return None
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


def signed_peer_id(subkey: object) -> Optional[str]:
    """The peer id a record's subkey names, if the key that signed it is that peer's own; else None."""
    parts = split_owner_subkey(subkey)
    if parts is None:
        return None
    name, key = parts
    return name if peer_id_of(key) == name else None
