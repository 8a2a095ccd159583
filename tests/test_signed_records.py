"""Signed DHT records: only a peer can write the records that name it, and readers drop the rest."""

from __future__ import annotations

import math

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.utils import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from petals_like.data_structures import ServerInfo, ServerState
from petals_like.dht.announce import declare_blocks, get_block_infos, get_models
from petals_like.dht.identity import Identity, peer_id_of, signed_peer_id
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import MODELS_KEY, ModelInfo, block_key, model_record
from tests.swarm import LOCALHOST


def test_a_subkey_names_a_peer_only_with_that_peers_own_key():
    mine, other = Identity(), Identity()
    try:
        me, them = peer_id_of(mine.public_key), peer_id_of(other.public_key)
        assert me != them and me.startswith("Qm")
        assert signed_peer_id(mine.owner_subkey(me)) == me
        assert signed_peer_id(mine.owner_subkey(them)) is None  # my key cannot speak for them
        for junk in (me, f"{me}[owner:ssh-rsa AAAA]", f"{me}[owner:{mine.public_key}][owner:x]", 42, None, "x" * 5000):
            assert signed_peer_id(junk) is None
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
        small_key = small.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        assert peer_id_of(small_key) is None  # below libp2p's minimum: cheap identities for a flood
    finally:
        mine.close()
        other.close()


@pytest.fixture(scope="module")
def nodes():
    first = SwarmNode(host_maddrs=LOCALHOST, name="first")
    made = [first]
    try:
        made += [SwarmNode(first.visible_maddrs(), host_maddrs=LOCALHOST, name=name) for name in ("victim", "stranger")]
        yield made
    finally:
        for node in made:
            node.shutdown()


def test_strangers_cannot_write_or_fake_another_servers_records(nodes):
    reader, victim, stranger = nodes
    info = ServerInfo(ServerState.ONLINE, 0, 2, throughput=1.0, public_name="real")
    assert victim.run(
        declare_blocks(
            victim.dht, "model", range(2), info, identity=victim.identity, expiration=60, model=ModelInfo(num_blocks=2)
        )
    )
    fake = ServerInfo(ServerState.OFFLINE, 0, 2, public_name="fake").to_record()
    expiration = get_dht_time() + 60

    async def attack() -> list[bool]:
        return [
            # the victim's own subkey: the stranger cannot sign it, so every node refuses the store
            await stranger.dht.store(
                block_key("model", 0), fake, expiration, subkey=victim.identity.owner_subkey(victim.peer_id)
            ),
            # the victim's peer id under the stranger's key: stored, but readers see it is not the victim's
            await stranger.dht.store(
                block_key("model", 1), fake, expiration, subkey=stranger.identity.owner_subkey(victim.peer_id)
            ),
            # a plain subkey (the old, unsigned form)
            await stranger.dht.store(block_key("model", 1), fake, expiration, subkey=victim.peer_id),
            # a lie about the model, outvoted by what its servers say
            await stranger.dht.store(
                MODELS_KEY,
                model_record("model", ModelInfo(num_blocks=9)),
                expiration,
                subkey=stranger.identity.owner_subkey(stranger.peer_id),
            ),
        ]

    # every node refuses what only the victim may write and what nobody may; a stranger's own record is stored
    assert stranger.run(attack(), timeout=60) == [False, False, False, True]
    blocks = reader.run(get_block_infos(reader.dht, "model", range(2)), timeout=60)
    assert [{p: i.public_name for p, i in block.items()} for block in blocks] == [{victim.peer_id: "real"}] * 2
    # two servers (the victim and one more honest one) outvote the stranger
    honest = ServerInfo(ServerState.ONLINE, 0, 2)
    assert reader.run(
        declare_blocks(
            reader.dht, "model", range(2), honest, identity=reader.identity, expiration=60, model=ModelInfo(num_blocks=2)
        )
    )
    assert reader.run(get_models(reader.dht), timeout=60)["model"].num_blocks == 2


def test_nodes_refuse_signed_records_that_break_the_schema(nodes):
    reader, _, stranger = nodes
    expiration = get_dht_time() + 60
    own = stranger.identity.owner_subkey(stranger.peer_id)

    async def store(key: str, value, subkey: str) -> bool:
        return await stranger.dht.store(key, value, expiration, subkey=subkey)

    junk = [
        (block_key("junk", 0), {"state": 7, "start_block": 0, "end_block": 1}, own),
        (block_key("junk", 0), "not a record", own),
        (MODELS_KEY, {"dht_prefix": "junk", "num_blocks": -1}, own),
        (MODELS_KEY, model_record("junk", ModelInfo(1)), stranger.identity.owner_subkey(f"junk@{stranger.peer_id}")),
    ]
    assert [stranger.run(store(*args), timeout=60) for args in junk] == [False] * len(junk)
    assert reader.run(get_block_infos(reader.dht, "junk", range(1)), timeout=60) == [{}]
    good = ServerInfo(ServerState.ONLINE, 0, 1).to_record()
    assert stranger.run(store(block_key("junk", 0), good, own), timeout=60)  # the same peer, a valid record


def test_spans_past_the_models_end_are_ignored():
    from petals_like.dht.records import parse_block_entries

    raw = {"inside": ServerInfo(ServerState.ONLINE, 0, 8).to_record(), "past": ServerInfo(ServerState.ONLINE, 0, 100).to_record()}
    assert set(parse_block_entries(raw, 2)) == {"inside", "past"}  # the model's size unknown: both plausible
    assert set(parse_block_entries(raw, 2, num_blocks=8)) == {"inside"}


def test_each_key_keeps_its_dictionary_within_the_byte_budget(monkeypatch):
    import hivemind.utils.timed_storage as timed_storage
    from hivemind.dht.routing import DHTID

    from petals_like.dht.storage import REFRESH_HEADROOM, BoundedStorage

    clock = [1000.0]
    monkeypatch.setattr(timed_storage, "get_dht_time", lambda: clock[0])
    storage, key, other = BoundedStorage(max_key_bytes=10_000), DHTID.generate(source="k"), DHTID.generate(source="o")
    assert all(storage.store_subkey(key, f"s{i}", b"x" * 998, 1060.0) for i in range(5))  # 5 x (2 + 998) bytes
    assert storage.store_subkey(key, "s5", b"x" * 4_998, 1100.0)  # exactly the budget
    assert not storage.store_subkey(key, "s6", b"", 1100.0)  # a new subkey past it
    assert storage.store_subkey(key, "s0", b"y" * (998 + REFRESH_HEADROOM), 1061.0)  # a refresh may grow a little
    assert not storage.store_subkey(key, "s1", b"y" * 999, 1061.0)  # not more
    assert storage.store_subkey(other, "s6", b"x" * 9_000, 1100.0)  # the budget is per key
    clock[0] = 1062.0  # s0..s4 have expired: room again
    assert storage.store_subkey(key, "s6", b"", 1100.0)
    copy = BoundedStorage.replacing(storage)
    assert len(copy) == 2  # what the storage it replaces held
    assert dict(copy.get(other).value.items()) == dict(storage.get(other).value.items())


def test_a_record_that_passed_is_checked_once(monkeypatch):
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer

    from petals_like.dht.records import SwarmRecordValidator, SwarmValidator

    identity = Identity()
    try:
        validator, calls = SwarmValidator(identity.private_key, remembered=2), []
        check = SwarmRecordValidator.validate
        monkeypatch.setattr(SwarmRecordValidator, "validate", lambda self, record: calls.append(record) or check(self, record))
        subkey = MSGPackSerializer.dumps(identity.owner_subkey(peer_id_of(identity.public_key)))
        value = MSGPackSerializer.dumps(ServerInfo(ServerState.ONLINE, 0, 1).to_record())

        def signed(expiration: float) -> DHTRecord:
            record = DHTRecord(b"k" * 20, subkey, value, expiration)
            return DHTRecord(record.key, subkey, validator.sign_value(record), expiration)

        now = get_dht_time()
        first, second, third = signed(now + 60), signed(now + 61), signed(now + 62)
        assert validator.validate(first) and validator.validate(first) and len(calls) == 1
        assert not validator.validate(DHTRecord(first.key, first.subkey, first.value, now + 70))  # not what was signed
        assert not validator.validate(DHTRecord(first.key, first.subkey, first.value, now + 70))  # failures: checked again
        assert validator.validate(second) and validator.validate(third) and validator.validate(first)  # first: forgotten
        assert len(calls) == 4  # the bad one never reached the schema check: its signature failed first
    finally:
        identity.close()


def test_a_refused_replay_leaves_the_newer_entry_in_place(monkeypatch):
    """hivemind's TimedStorage moves an entry's expiry to an older store's time before refusing that store:
    the replay of an old record would delete the server's current one when the old one expires."""
    import hivemind.utils.timed_storage as timed_storage
    from hivemind.dht.routing import DHTID

    from petals_like.dht.storage import BoundedStorage

    clock = [1000.0]
    monkeypatch.setattr(timed_storage, "get_dht_time", lambda: clock[0])
    storage, key = BoundedStorage(), DHTID.generate(source="k")
    assert storage.store_subkey(key, "server", b"old", 1090.0) and storage.store_subkey(key, "server", b"new", 1120.0)
    assert not storage.store_subkey(key, "server", b"same time", 1120.0)
    assert not storage.store_subkey(key, "server", b"old", 1090.0)  # the replay, last
    for bad in (math.nan, math.inf, -math.inf):
        assert not storage.store_subkey(key, "other", b"x", bad)
    clock[0] = 1100.0  # past the replay's expiration, before the newer one's
    assert dict(storage.get(key).value.items())["server"].value == b"new"


def test_a_search_cannot_write_into_the_storage_it_starts_from():
    """A search merges every reply into the first value it has, the node's own: get() hands out a copy."""
    from hivemind.dht.routing import DHTID

    from petals_like.dht.storage import BoundedStorage

    storage, key = BoundedStorage(), DHTID.generate(source="k")
    assert storage.store_subkey(key, "mine", b"x", get_dht_time() + 60)
    storage.get(key).value.store("merged from a reply", b"y" * 10_000, get_dht_time() + 60)
    assert [subkey for subkey, _ in storage.get(key).value.items()] == ["mine"]


def test_nodes_refuse_expirations_that_are_not_times_within_the_lifetime():
    from petals_like.dht.records import MAX_LIFETIME, check_envelope

    identity = Identity()
    try:
        subkey = MSGPackSerializer.dumps(identity.owner_subkey(peer_id_of(identity.public_key)))
        check_envelope(subkey, b"\x80", get_dht_time() + 60)
        for expiration in (math.nan, math.inf, get_dht_time() + MAX_LIFETIME + 60):
            with pytest.raises(ValueError):
                check_envelope(subkey, b"\x80", expiration)
    finally:
        identity.close()


def test_a_dictionary_loses_its_bad_entries_not_its_good_ones():
    """hivemind refuses a whole dictionary (a reply, a store) for one bad entry; nodes keep the valid ones, and
    the sender's `maxsize` (a string made every reader's search hang) is ignored."""
    from types import SimpleNamespace

    from hivemind.dht.routing import DHTID
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.dht.validation import DHTRecord

    from petals_like.dht.guards import _keep_valid_entries
    from petals_like.dht.records import SwarmValidator

    identity = Identity()
    try:
        validator = SwarmValidator(identity.private_key)
        protocol = SimpleNamespace(record_validator=validator, serializer=MSGPackSerializer)
        key, expiration = DHTID.generate(source="m.0").to_bytes(), get_dht_time() + 60
        good = identity.owner_subkey(peer_id_of(identity.public_key))
        value = MSGPackSerializer.dumps(ServerInfo(ServerState.ONLINE, 0, 1).to_record())
        signed = validator.sign_value(DHTRecord(key, MSGPackSerializer.dumps(good), value, expiration))
        entries = DictionaryDHTValue()
        entries.store(good, signed, expiration)
        entries.store("unsigned", value, expiration + 1)
        entries.store(good.replace("Qm", "Xx", 1), signed, expiration + 2)  # signed, but not by the peer named
        entries.maxsize = "x"
        assert _keep_valid_entries(protocol, key, entries)
        assert [subkey for subkey, _ in entries.items()] == [good] and entries.maxsize == math.inf
    finally:
        identity.close()


def test_a_node_keeps_all_its_keys_within_its_budget(monkeypatch):
    import hivemind.utils.timed_storage as timed_storage
    from hivemind.dht.routing import DHTID

    from petals_like.dht.storage import BoundedStorage

    clock = [1000.0]
    monkeypatch.setattr(timed_storage, "get_dht_time", lambda: clock[0])
    storage = BoundedStorage(max_key_bytes=10_000, max_node_bytes=25_000)
    keys = [DHTID.generate(source=f"k{i}") for i in range(4)]
    assert all(storage.store_subkey(key, "s", b"x" * 7_999, 1060.0 + i) for i, key in enumerate(keys[:3]))  # 24,000
    assert not storage.store_subkey(keys[3], "s", b"x" * 1_999, 1100.0)  # a new key past the node's budget
    assert not storage.store_subkey(keys[0], "t", b"", 1100.0)  # a new subkey too
    assert storage.store_subkey(keys[0], "s", b"y" * 7_999, 1070.0)  # a refresh of the same size
    clock[0] = 1061.5  # keys[1]'s entry has expired: room again
    assert storage.store_subkey(keys[3], "s", b"x" * 1_999, 1100.0)
