"""A hostile node against a real swarm (run_dht and run_server processes): what it stores is refused by
every validating node, and clients and the dashboard keep seeing, and using, the true servers.

Each attack is what a modified node can send (tests/hostile.py). After each group, a fresh client
generates (equal to transformers) and a fresh dashboard reader lists the servers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time

from petals_like import AutoDistributedModelForCausalLM
from petals_like.dashboard.reader import SwarmReader
from petals_like.data_structures import ServerInfo, ServerState
from petals_like.dht.announce import get_block_infos
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import MAX_LIFETIME, MAX_RECORD_BYTES, MODELS_KEY, ModelInfo, block_key, compute_spans, model_record
from petals_like.dht.storage import MAX_KEY_BYTES, REFRESH_HEADROOM
from petals_like.testing.local_swarm import LocalSwarm
from tests.hostile import NO_SUBKEY, HostileNode, Key, make_fake_servers
from tests.swarm import LOCALHOST, wait_until

PREFIX = "tiny-llama"  # the tiny model's folder name, its dht_prefix
NUM_BLOCKS = 8
NUM_FAKES = 1000


class World:
    def __init__(self, swarm: LocalSwarm, hostile: HostileNode):
        self.swarm = swarm
        self.hostile = hostile
        self.dht_peer = swarm.peers[0].rsplit("/p2p/", 1)[1]

    @property
    def honest(self) -> list[str]:
        """Every validating node of the swarm: the bootstrap DHT and the servers."""
        return [self.dht_peer, *self.swarm.server_peer_ids]

    def online_servers(self, initial_peers: Optional[list[str]] = None) -> dict[str, tuple[int, int]]:
        """{peer id: span} of the ONLINE servers a fresh reader finds (joining through initial_peers)."""
        reader = SwarmNode(initial_peers or self.swarm.peers, host_maddrs=LOCALHOST, client_mode=True, name="reader")
        try:
            infos = reader.run(get_block_infos(reader.dht, PREFIX, range(NUM_BLOCKS), num_blocks=NUM_BLOCKS), timeout=60)
        finally:
            reader.shutdown()
        return {peer: (span.start, span.end) for peer, span in compute_spans(infos).items()}


@pytest.fixture(scope="module")
def world(tiny_model: Path) -> Iterator[World]:
    with LocalSwarm(tiny_model, spans=["0:4", "4:8"], server_args=["--throughput", "1"]) as swarm:
        hostile = HostileNode(swarm.peers)
        try:
            yield World(swarm, hostile)
        finally:
            hostile.shutdown()


def check_generation(world: World, tiny_model: Path, reference, **kwargs) -> AutoDistributedModelForCausalLM:
    """A fresh client generates what transformers does, and no server failed it; returns it, still open."""
    kwargs.setdefault("initial_peers", world.swarm.peers)
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, torch_dtype="float32", **kwargs)
    try:
        input_ids = torch.tensor([[1, 17, 42, 99]])
        expected = reference.generate(input_ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(model.generate(input_ids, max_new_tokens=16), expected)
        assert model.routes.banned() == set()  # no request went to a server that failed it
    except BaseException:
        model.shutdown()
        raise
    return model


def dashboard_view(world: World, reads: int = 1) -> dict:
    """The dashboard's view of the model after `reads` reads by one reader."""
    node = SwarmNode(world.swarm.peers, host_maddrs=LOCALHOST, client_mode=True, name="dashboard")
    try:
        reader = SwarmReader(node, rpc_timeout=2.0)
        for _ in range(reads):
            state = reader.read()
    finally:
        node.shutdown()
    (view,) = [m for m in state["models"] if m["dht_prefix"] == PREFIX]
    return view


def online_rows(view: dict) -> dict[str, tuple[int, int]]:
    return {s["peer_id"]: (s["start_block"], s["end_block"]) for s in view["servers"] if s["status"] == "online"}


def test_hostile_stores_are_refused_by_every_validating_node(world: World, tiny_model: Path, reference):
    hostile, honest = world.hostile, world.honest
    victim = world.swarm.server_peer_ids[0]
    (victim_subkey,) = [s for s in hostile.read_signed(world.dht_peer, block_key(PREFIX, 0)) if s.startswith(victim)]
    now = get_dht_time()
    later, far = now + 600, now + 10 * 365 * 86400
    offline = ServerInfo(ServerState.OFFLINE, 0, 4).to_record()
    fake = ServerInfo(ServerState.ONLINE, 0, NUM_BLOCKS, throughput=1e6, public_name="fake").to_record()
    own = hostile.key

    def signed(key: Key, block: str, subkey: str, value, expiration: float) -> tuple:
        return block, subkey, key.sign(block, subkey, value, expiration), expiration

    b0, b1 = block_key(PREFIX, 0), block_key(PREFIX, 1)
    ints = DictionaryDHTValue()  # an integer and a string subkey with one expiration: hivemind's heap cannot order them
    ints.store(5, b"\x00", later)
    ints.store(own.subkey(), b"\x00", later + 1)
    ints.data[own.subkey()] = ValueWithExpiration(b"\x00", later)
    attacks = {
        # the plain value of the issue: replaces the dictionary of signed records wherever it is accepted
        "plain value": (b0, NO_SUBKEY, {victim_subkey: offline}, later),
        "plain value, far future": (b0, NO_SUBKEY, {victim_subkey: offline}, far),
        "plain value under the models key": (MODELS_KEY, NO_SUBKEY, {own.subkey(): {"num_blocks": 1}}, later),
        "unsigned subkey": (b0, victim, offline, later),
        "integer subkey": (b0, 5, offline, later),
        "bytes subkey": (b0, victim.encode(), offline, later),
        "list subkey": (b0, [victim], offline, later),
        # the victim's own subkey, signed by the attacker's key: the signature does not match
        "forged owner subkey": signed(own, b0, victim_subkey, offline, later),
        # the victim's peer id under the attacker's key: signed, but not by the peer it names
        "victim's name, attacker's key": signed(own, b0, own.subkey(victim), offline, later),
        "own record, far future": signed(own, b0, own.subkey(), fake, far),
        "own record, past MAX_LIFETIME": signed(own, b0, own.subkey(), fake, now + MAX_LIFETIME + 60),
        # NaN passes any `expiration > limit` check and, stored, stops hivemind's expiry of the whole key
        "own record, NaN expiration": signed(own, b0, own.subkey(), fake, math.nan),
        "own record, infinite expiration": signed(own, b0, own.subkey(), fake, math.inf),
        "own record, broken schema": signed(own, b0, own.subkey(), {"state": 7, "start_block": 0, "end_block": 1}, later),
        "own record, not a mapping": signed(own, b0, own.subkey(), "hello", later),
        "own record, oversized": signed(own, b1, own.subkey(), {**fake, "padding": "x" * MAX_RECORD_BYTES}, later),
        "server record under the models key": signed(own, MODELS_KEY, own.subkey(), fake, later),
        "model record under a block key": signed(own, b0, own.subkey(), model_record(PREFIX, ModelInfo(1)), later),
        "model record, broken prefix": signed(own, MODELS_KEY, own.subkey(), {"dht_prefix": "a b", "num_blocks": 8}, later),
    }
    for name, (key, subkey, value, expiration) in attacks.items():
        raw = isinstance(value, bytes)
        answers = hostile.store(honest, key, subkey, value, expiration, raw=raw)
        assert answers == {peer: [False] for peer in honest}, name
    # its own valid record into the cache hivemind keeps beside each node's storage: a node answers from the
    # cache instead of the storage whenever the cached copy expires later, which would hide every real record
    answers = hostile.store(honest, b0, own.subkey(), own.sign(b0, own.subkey(), fake, later), later, raw=True, in_cache=True)
    assert answers == {peer: [False] for peer in honest}
    # a whole dictionary that hivemind's storage cannot even load: the store fails, the node keeps serving
    answers = hostile.store(honest, b1, None, ints, later, raw=True)
    assert all(answer in (None, [False]) for answer in answers.values())

    assert world.online_servers() == {victim: (0, 4), world.swarm.server_peer_ids[1]: (4, 8)}
    check_generation(world, tiny_model, reference).shutdown()
    view = dashboard_view(world)
    assert view["healthy"] and online_rows(view) == {victim: (0, 4), world.swarm.server_peer_ids[1]: (4, 8)}


def test_what_a_node_without_validators_serves_is_ignored_by_readers(world: World, tiny_model: Path, reference):
    """Readers check what they get back as nodes check what they store: a node running no validators
    (or an old version) serves its plain values and foreign entries to every reader that asks."""
    hostile, own = world.hostile, world.hostile.key
    victim, other = world.swarm.server_peer_ids[:2]
    (victim_subkey,) = [s for s in hostile.read_signed(world.dht_peer, block_key(PREFIX, 0)) if s.startswith(victim)]
    now = get_dht_time()
    later, far = now + 600, now + 10 * 365 * 86400
    fake = ServerInfo(ServerState.ONLINE, 0, NUM_BLOCKS, throughput=1e6, public_name="fake").to_record()
    b = [block_key(PREFIX, i) for i in range(NUM_BLOCKS)]
    hostile.plant(b[0], NO_SUBKEY, {victim_subkey: ServerInfo(ServerState.OFFLINE, 0, 4).to_record()}, far)
    hostile.plant(MODELS_KEY, NO_SUBKEY, {own.subkey(): model_record(PREFIX, ModelInfo(2))}, far)
    hostile.plant(b[4], other, ServerInfo(ServerState.OFFLINE, 4, 8).to_record(), far)  # unsigned
    hostile.plant(b[5], own.subkey(other), own.sign(b[5], own.subkey(other), fake, far), far)  # not the peer it names
    hostile.plant(b[6], 5, fake, later)  # an integer subkey beside a string one: dropped, the valid entry kept
    hostile.plant(b[6], own.subkey(), own.sign(b[6], own.subkey(), fake, later + 1), later + 1)
    hostile.plant(b[7], own.subkey(), own.sign(b[7], own.subkey(), fake, far), far)  # its own record, far future

    # the real servers with their spans; besides them only the attacker's own valid record (block 6)
    assert world.online_servers() == {victim: (0, 4), other: (4, 8), own.peer_id: (6, 7)}
    check_generation(world, tiny_model, reference).shutdown()
    view = dashboard_view(world)
    assert view["healthy"] and online_rows(view) == {victim: (0, 4), other: (4, 8)} and view["num_blocks"] == NUM_BLOCKS


def test_a_reply_dated_infinity_does_not_end_a_search(world: World, tiny_model: Path, reference):
    """hivemind checks each entry of a reply, not the date of the whole, and ends a search for the latest
    value once a reply is dated that late: a node answering every block with its own entry, dated
    infinity, would be the only node a reader heard. Readers date a reply by its latest entry."""
    hostile, own = world.hostile, world.hostile.key
    later = get_dht_time() + 600
    fake = ServerInfo(ServerState.ONLINE, 0, NUM_BLOCKS, throughput=1e6, public_name="fake").to_record()
    for key in [block_key(PREFIX, i) for i in range(NUM_BLOCKS)] + [MODELS_KEY]:
        value = model_record(PREFIX, ModelInfo(2)) if key == MODELS_KEY else fake
        entries = DictionaryDHTValue()
        entries.store(own.subkey(), own.sign(key, own.subkey(), value, later), later)
        hostile.plant(key, NO_SUBKEY, entries, math.inf)
    via_hostile = hostile.node.visible_maddrs()  # the reader asks the hostile node first
    seen = world.online_servers(via_hostile)
    victim, other = world.swarm.server_peer_ids[:2]
    assert seen[victim] == (0, 4) and seen[other] == (4, 8)
    check_generation(world, tiny_model, reference, initial_peers=via_hostile).shutdown()


def test_a_reply_that_hivemind_cannot_read_is_no_answer(world: World, tiny_model: Path, reference):
    """A dictionary's `maxsize` travels in the reply, and hivemind compares it with the number of entries
    when it reads them: a string there made a reader's search raise inside one of its workers, and the
    search, waiting for that worker, never ended (clients hung, servers stopped announcing)."""
    hostile, own = world.hostile, world.hostile.key
    later = get_dht_time() + 600
    fake = ServerInfo(ServerState.ONLINE, 0, NUM_BLOCKS, public_name="fake").to_record()
    for key in [block_key(PREFIX, i) for i in range(NUM_BLOCKS)] + [MODELS_KEY]:
        value = model_record(PREFIX, ModelInfo(2)) if key == MODELS_KEY else fake
        entries = DictionaryDHTValue()
        entries.store(own.subkey(), own.sign(key, own.subkey(), value, later), later)
        entries.maxsize, entries.frozen = "x", True  # frozen: the hostile node itself never compares it
        hostile.plant(key, NO_SUBKEY, entries, later)
    via_hostile = hostile.node.visible_maddrs()
    seen = world.online_servers(via_hostile)
    victim, other = world.swarm.server_peer_ids[:2]
    assert seen[victim] == (0, 4) and seen[other] == (4, 8)
    check_generation(world, tiny_model, reference, initial_peers=via_hostile).shutdown()


def test_replayed_records_do_not_take_a_server_out_or_hang_a_client(world: World, tiny_model: Path, reference):
    swarm, hostile = world.swarm, world.hostile
    b4 = block_key(PREFIX, 4)
    spare = swarm.start_server("4:8", identity="spare")
    spare_id = swarm.wait_ready(spare)
    wait_until(lambda: spare_id in world.online_servers(), timeout=60, message="the spare server announced")

    # an OFFLINE record of a server that is serving: from when it stopped once and came back
    spare.stop()  # SIGTERM: it announces OFFLINE
    wait_until(lambda: spare_id not in world.online_servers(), timeout=60, message="the spare server left")
    (offline,) = [(s, v) for s, v in hostile.read_signed(world.dht_peer, b4).items() if s.startswith(spare_id)]
    swarm.children.remove(spare)
    spare = swarm.start_server("4:8", identity="spare")
    assert swarm.wait_ready(spare) == spare_id
    subkey, (value, expiration) = offline
    answers = hostile.store(world.honest, b4, subkey, value, expiration, raw=True)
    assert answers[world.dht_peer] == [False]  # the DHT holds its newer ONLINE record: the older one is refused
    assert world.online_servers()[spare_id] == (4, 8)  # at once, not one announce period later

    # an ONLINE record of a server that is gone: replayed after it crashed
    (online,) = [(s, v) for s, v in hostile.read_signed(world.dht_peer, b4).items() if s.startswith(spare_id)]
    swarm.kill(spare)
    subkey, (value, expiration) = online
    hostile.store(world.honest, b4, subkey, value, expiration, raw=True)  # refused (held already) or not: same
    assert spare_id in world.online_servers()  # its record says ONLINE until it expires
    model = check_generation(world, tiny_model, reference)  # no step went to it: it was pinged and skipped
    try:
        assert spare_id in model.routes.pings.unreachable
    finally:
        model.shutdown()


@pytest.fixture(scope="module")
def fakes() -> list:
    """NUM_FAKES identities, each with ONLINE records claiming every block (fast, idle, with room for any
    session) and a record in the list of models."""
    record = ServerInfo(ServerState.ONLINE, 0, NUM_BLOCKS, throughput=1e6, cache_tokens_left=10**6).to_record()
    records = {block_key(PREFIX, i): record for i in range(NUM_BLOCKS)}
    records[MODELS_KEY] = model_record(PREFIX, ModelInfo(NUM_BLOCKS))
    return make_fake_servers(NUM_FAKES, records, get_dht_time() + 1200)


def test_a_thousand_fake_servers_cost_a_client_one_ping_each(world: World, fakes: list, tiny_model: Path, reference):
    hostile = world.hostile
    entries = [entry for _, records in fakes for entry in records]
    for start in range(0, len(entries), 500):  # each request well under hivemind's 4 MiB message limit
        answers = hostile.store_many(world.honest, entries[start : start + 500])
        assert all(answer is not None and all(answer) for answer in answers.values())  # valid: accepted everywhere

    seen = world.online_servers()
    assert len(seen) >= NUM_FAKES and set(world.swarm.server_peer_ids[:2]) <= set(seen)

    model = check_generation(world, tiny_model, reference)
    try:
        routes = model.routes
        fakes_ids = {key.peer_id for key, _ in fakes}
        assert fakes_ids <= routes.pings.unreachable
        # one refresh of the view: one ping per server it lists, and none more for planning the chains
        assert routes.pings.sent <= len(routes.spans) + NUM_FAKES // 100
    finally:
        model.shutdown()
    # a client told which servers it may use (a private swarm's operator knows them) does not even ping the rest
    model = check_generation(world, tiny_model, reference, allowed_servers=world.swarm.server_peer_ids[:2])
    try:
        assert set(model.routes.spans) == set(world.swarm.server_peer_ids[:2]) and model.routes.pings.sent == 2
    finally:
        model.shutdown()

    view = dashboard_view(world, reads=2)  # a read probes max_probes servers, those that answered before first
    rows = online_rows(view)
    assert set(world.swarm.server_peer_ids[:2]) <= set(rows) and not fakes_ids & set(rows)
    assert view["healthy"] and view["servers_by_status"]["unreachable"] >= NUM_FAKES


def test_keys_flooded_past_the_message_limit_stay_readable(world: World, fakes: list, tiny_model: Path, reference):
    """hivemind answers a search with a key's whole dictionary in one message, which the daemon does not send
    over 4 MiB, and asks for several keys in one message. The fake servers refresh their entries under
    every block with records of ~30 KiB each (3.3 MiB per key): every node keeps each key within its
    budget, each key stays readable from each node, and a client, whose search asks for 8 keys, generates."""
    expiration = get_dht_time() + 1200
    padded = {**ServerInfo(ServerState.ONLINE, 0, NUM_BLOCKS, throughput=1e6).to_record(), "padding": "x" * 30_000}
    for block in range(NUM_BLOCKS):
        key = block_key(PREFIX, block)
        entries = [(key, k.subkey(), k.sign(key, k.subkey(), padded, expiration), expiration) for k, _ in fakes[:110]]
        for start in range(0, len(entries), 55):
            answers = world.hostile.store_many(world.honest, entries[start : start + 55])
            assert all(answer is not None for answer in answers.values())
    servers = {block: world.swarm.server_peer_ids[0 if block < 4 else 1] for block in range(NUM_BLOCKS)}
    reader = SwarmNode(world.swarm.peers, host_maddrs=LOCALHOST, client_mode=True, name="reader")
    try:
        ids = [DHTID.generate(source=block_key(PREFIX, block)) for block in range(NUM_BLOCKS)]
        for peer in world.honest:  # one search asks a node for all 8 keys: each answers, the real server among the rest
            found = reader.run(reader.dht.protocol.call_find(PeerID.from_base58(peer), ids), timeout=60)
            assert found is not None, peer
            for block, key_id in enumerate(ids):
                held = dict(found[key_id][0].value.items())
                assert any(subkey.startswith(servers[block]) for subkey in held), (peer, block)
                assert (
                    MAX_KEY_BYTES - 40_000
                    < sum(len(s) + len(v) for s, (v, _) in held.items())
                    <= MAX_KEY_BYTES + REFRESH_HEADROOM
                )
    finally:
        reader.shutdown()
    check_generation(world, tiny_model, reference).shutdown()
