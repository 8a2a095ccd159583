"""The DHT record schema, in one place, and the rule every node applies to what it stores and reads.

key    = "{dht_prefix}.{block_index}"  (one key per block of a model; many models share one swarm)
subkey = "{peer id}[owner:{public key}]": the server's peer id, signed (dht/identity.py)
value  = ServerInfo.to_record(), expiring unless re-announced

The list of models in the swarm, so that a reader (the dashboard) can find every model:
key    = MODELS_KEY
subkey = "{peer id}[owner:{public key}]", as above: one entry per server
value  = model_record(): ModelInfo.to_record() plus the model's dht_prefix

Nothing else is ever written, so nothing else is accepted (SwarmValidator): every node refuses to
store, and drops from what other nodes send back, any value without a subkey (hivemind would let it
replace the whole dictionary of signed entries), any subkey that is not a string signed by the peer it
names, a value that breaks the schema or is larger than MAX_RECORD_BYTES, and an expiration further than
MAX_LIFETIME ahead. Readers (dht/announce.py) check again what only they know: the block a record is
stored under, the model's size. docs/security.md lists what these rules stop and what they cannot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import MAX_DHT_TIME_DISCREPANCY_SECONDS, get_dht_time

from petals_like.data_structures import MAX_BLOCKS, MAX_TEXT, RemoteSpanInfo, ServerInfo, ServerState
from petals_like.dht.identity import MAX_SUBKEY, signed_peer_id

logger = logging.getLogger(__name__)

_PREFIX_ALLOWED = re.compile(r"[^A-Za-z0-9_\-]")
MODELS_KEY = "petals_like.models"  # not "{prefix}.{int}", so it never meets a block key
MAX_PREFIX = 128  # characters in a dht_prefix read from a record
MAX_RECORD_BYTES = 32 * 1024  # a record as stored, signature included; a server's own stays under ~22 KiB
# (64 adapter names of 256 characters and 64 next pings), a usual one near 1 KiB
MAX_LIFETIME = 3600.0  # seconds ahead of now that a record may expire (servers re-announce every ~30 s)


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


def parse_block_entries(entries: Mapping[str, Any], block_index: int, num_blocks: Optional[int] = None) -> dict[str, ServerInfo]:
    """{peer id: ServerInfo} of one block's signed entries ({peer id: record}, announce.signed_entries);
    malformed records are dropped with a warning.

    A record claiming a span that does not contain the block it was stored under, or (given the model's
    num_blocks) that reaches past the model's last block, is nonsense too.
    """
    result: dict[str, ServerInfo] = {}
    for peer_id, value in entries.items():
        try:
            info = ServerInfo.from_record(value)
            if not info.start_block <= block_index < info.end_block:
                raise ValueError(f"span {info.start_block}:{info.end_block} does not contain block {block_index}")
            if num_blocks is not None and info.end_block > num_blocks:
                raise ValueError(f"span {info.start_block}:{info.end_block} reaches past the model's {num_blocks} blocks")
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


def check_dht_prefix(prefix: Any) -> str:
    """A dht_prefix read from a record: a short printable string without spaces (it becomes part of keys)."""
    if not isinstance(prefix, str) or not 0 < len(prefix) <= MAX_PREFIX:
        raise ValueError(f"dht_prefix must be a string of 1 to {MAX_PREFIX} characters")
    if not prefix.isprintable() or any(c.isspace() for c in prefix):
        raise ValueError("dht_prefix must be printable and without spaces")
    return prefix


@dataclass(frozen=True)
class ModelInfo:
    """What a server announces about the model it serves part of (one record per model)."""

    num_blocks: int  # transformer blocks of the whole model
    name: str = ""  # hub name or checkpoint folder name, for people reading the dashboard

    def to_record(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "name": self.name}

    @classmethod
    def from_record(cls, raw: Any) -> ModelInfo:
        """Validate a record read from the DHT; unknown fields are dropped so versions can mix."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"model info must be a mapping, got {type(raw).__name__}")
        num_blocks = raw.get("num_blocks")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 0 < num_blocks <= MAX_BLOCKS:
            raise ValueError(f"num_blocks={num_blocks!r} is not in [1, {MAX_BLOCKS}]")
        name = raw.get("name", "")
        if not isinstance(name, str) or len(name) > MAX_TEXT:
            raise ValueError(f"name must be a string of at most {MAX_TEXT} characters")
        return cls(num_blocks=num_blocks, name=name)


def model_record(dht_prefix: str, model: ModelInfo) -> dict[str, Any]:
    """A server's entry in the list of models (MODELS_KEY)."""
    return {"dht_prefix": dht_prefix, **model.to_record()}


def parse_model_record(raw: Any) -> tuple[str, ModelInfo]:
    """(dht_prefix, ModelInfo) of an entry in the list of models; raises ValueError if it is malformed."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"model record must be a mapping, got {type(raw).__name__}")
    return check_dht_prefix(raw.get("dht_prefix")), ModelInfo.from_record(raw)


def check_envelope(subkey_bytes: bytes, value_bytes: bytes, expiration_time: float) -> None:
    """Raise ValueError unless the record's sizes, subkey and expiration are what the project writes: a
    subkey (string) signed by the peer it names, a value within MAX_RECORD_BYTES, a finite expiration at
    most MAX_LIFETIME from now. Cheap: it runs before the signature is checked."""
    if len(subkey_bytes) > MAX_SUBKEY + 8 or len(value_bytes) > MAX_RECORD_BYTES:
        raise ValueError(f"subkey of {len(subkey_bytes)} bytes or value of {len(value_bytes)} bytes is too large")
    subkey = MSGPackSerializer.loads(subkey_bytes)
    if signed_peer_id(subkey) is None:
        shown = subkey[:64] if isinstance(subkey, str) else type(subkey).__name__
        raise ValueError(f"subkey {shown!r} is not a peer id signed by that peer's own key")
    # NaN compares False with everything: it would pass `>` and, stored, stop hivemind's expiry of the whole key
    if not math.isfinite(expiration_time) or expiration_time > get_dht_time() + MAX_LIFETIME + MAX_DHT_TIME_DISCREPANCY_SECONDS:
        raise ValueError(f"expiration {expiration_time} is not a time within {MAX_LIFETIME:.0f} s from now")


def check_value(value_bytes: bytes, *, models: bool) -> None:
    """Raise ValueError unless the (signature-stripped) value parses as a model record (`models`: stored
    under MODELS_KEY) or a ServerInfo."""
    value = MSGPackSerializer.loads(value_bytes)
    if models:
        parse_model_record(value)
    else:
        ServerInfo.from_record(value)


class SwarmRecordValidator(RecordValidatorBase):
    """The schema part of SwarmValidator: the value of a record whose envelope (check_envelope) and
    signature passed. Runs after hivemind's signature validator, which has stripped the signature by
    then. Refusals are logged at DEBUG: a hostile peer decides how many there are."""

    def __init__(self) -> None:
        self._models_key_id = DHTID.generate(source=MODELS_KEY).to_bytes()  # what hivemind calls MODELS_KEY

    def validate(self, record: DHTRecord) -> bool:
        try:
            check_value(record.value, models=record.key == self._models_key_id)
        except Exception as e:  # anything a stranger's bytes make msgpack or the parsers raise
            logger.debug(f"Refusing a DHT record: {e!r}")
            return False
        return True


class SwarmValidator(CompositeValidator):
    """What every node runs, on every record it is asked to store and every entry of every reply
    (hivemind calls it with the reserved "no subkey" marker for a plain value, which fails the subkey
    check): check_envelope, then hivemind's RSASignatureValidator, then SwarmRecordValidator. Records that
    passed are remembered (by a digest of key, subkey, signed value and expiration), so each is checked
    once, not once per node whose reply carries it and again at every refresh. Checking a signature is
    about half of the cost of reading a key (~60 of ~130 us per entry of each reply); remembering them
    took a client's refresh among 1,000 fake servers from 2.3 s to 1.1 s (tests/flood_cost.py). A record
    that passed stays valid: its signature does not change, and its expiration only comes closer.
    Failures are not remembered, so a hostile peer cannot fill the memory with them."""

    def __init__(self, private_key: RSAPrivateKey, remembered: int = 65536):
        super().__init__([RSASignatureValidator(private_key), SwarmRecordValidator()])
        self._passed: OrderedDict[bytes, None] = OrderedDict()
        self._remembered = remembered

    def validate(self, record: DHTRecord) -> bool:
        digest = hashlib.blake2b(MSGPackSerializer.dumps(dataclasses.astuple(record)), digest_size=16).digest()
        if digest in self._passed:
            self._passed.move_to_end(digest)
            return True
        try:  # the cheap checks before the signature's: a huge made-up key would cost a millisecond a record
            check_envelope(record.subkey, record.value, record.expiration_time)
        except Exception as e:
            logger.debug(f"Refusing a DHT record: {e!r}")
            return False
        if not super().validate(record):
            return False
        self._passed[digest] = None
        if len(self._passed) > self._remembered:
            self._passed.popitem(last=False)
        return True
