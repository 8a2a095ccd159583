"""Servers as real run_server processes: clean shutdown, OFFLINE records, fail-over after a kill, no leftovers."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from petals_like import AutoDistributedModelForCausalLM
from petals_like.data_structures import ServerState
from petals_like.dht.announce import get_block_infos
from petals_like.dht.node import SwarmNode
from petals_like.dht.records import default_dht_prefix
from petals_like.testing.local_swarm import LocalSwarm
from tests.swarm import LOCALHOST, live_descendants, reap, wait_until

NUM_BLOCKS = 8


@pytest.fixture
def dht() -> Iterator[SwarmNode]:
    node = SwarmNode(host_maddrs=LOCALHOST, name="test-dht")
    yield node
    node.shutdown()


@pytest.fixture
def servers(dht, tiny_model: Path) -> Iterator[LocalSwarm]:
    """run_server processes joining `dht` (add_servers starts them); after the test, they and their p2pd are gone."""
    before = {p.pid for p in live_descendants()}
    with LocalSwarm(tiny_model, spans=(), initial_peers=dht.visible_maddrs(), server_args=["--throughput", "1"]) as swarm:
        yield swarm
        started = [p for p in live_descendants() if p.pid not in before]
    assert reap(started, grace=10) == [], "processes left running after the servers were stopped"


def block_states(dht: SwarmNode, prefix: str) -> list[dict[str, ServerState]]:
    infos = dht.run(get_block_infos(dht.dht, prefix, range(NUM_BLOCKS)))
    return [{peer: info.state for peer, info in block.items()} for block in infos]


def test_server_processes_serve_and_leave_cleanly(dht, servers, tiny_model: Path):
    peers = dht.visible_maddrs()
    prefix = default_dht_prefix(tiny_model)
    peer_ids = servers.add_servers(["0:4", "4:8"])
    wait_until(lambda: all(len(b) == 1 and ServerState.ONLINE in b.values() for b in block_states(dht, prefix)), 30)

    children = {server.pid: live_descendants(server.pid) for server in servers.servers}
    assert all(any(c.name() == "p2pd" for c in kids) for kids in children.values()), "each server runs one p2pd"

    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=peers)
    try:
        input_ids = torch.tensor([[1, 60, 61, 62]])
        expected = AutoModelForCausalLM.from_pretrained(tiny_model).generate(input_ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(model.generate(input_ids, max_new_tokens=16), expected)
    finally:
        model.shutdown()

    second = servers.servers[1]
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(30) == 0
    wait_until(
        lambda: all(b.get(peer_ids[1]) == ServerState.OFFLINE for b in block_states(dht, prefix)[4:]),
        15,
        message="OFFLINE announced for blocks 4:8",
    )
    wait_until(
        lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children[second.pid]),
        15,
        message="p2pd of the stopped server exits",
    )


def start_replicated(dht: SwarmNode, servers: LocalSwarm, tiny_model: Path) -> tuple[list[str], list[str]]:
    """Server processes on 0:4, 4:8 and 4:8 (a replica to fail over to); returns (initial peers, server peer ids)."""
    peer_ids = servers.add_servers(["0:4", "4:8", "4:8"])
    prefix = default_dht_prefix(tiny_model)
    wait_until(lambda: all(len(b) >= (2 if i >= 4 else 1) for i, b in enumerate(block_states(dht, prefix))), 30)
    return dht.visible_maddrs(), peer_ids


def test_generation_survives_a_killed_server(dht, servers, tiny_model: Path):
    """SIGKILL a server of the chain in the middle of a 128-token generation: the session moves to
    the replica and the tokens are exactly those of a run without failure."""
    peers, peer_ids = start_replicated(dht, servers, tiny_model)

    input_ids = torch.tensor([[1, 90, 91, 92, 93]])
    local = AutoModelForCausalLM.from_pretrained(tiny_model).generate(input_ids, max_new_tokens=128, do_sample=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=peers, ban_timeout=60)
    try:
        # the run without failure, past any EOS (so that the kill always lands mid-generation)
        expected = model.generate(input_ids, max_new_tokens=128, eos_token_id=[])
        assert torch.equal(expected[:, : local.shape[1]], local)  # equal to transformers up to its EOS
        with model.inference_session(max_length=160) as session:
            killed = []

            class KillAtHalf:  # a streamer: kills the server of blocks 4:8 after the 64th token
                count = 0

                def put(self, tokens):
                    KillAtHalf.count += 1
                    if KillAtHalf.count == 64:
                        victim = peer_ids.index(session._chain[-1].span.peer_id)
                        assert victim in (1, 2)
                        servers.kill(servers.servers[victim])
                        killed.append(peer_ids[victim])

                def end(self):
                    pass

            got = model.generate(input_ids, max_new_tokens=128, session=session, streamer=KillAtHalf(), eos_token_id=[])
            assert killed and session.num_failovers >= 1
            assert all(link.span.peer_id != killed[0] for link in session._chain)
        assert torch.equal(got, expected)
    finally:
        model.shutdown()


def test_num_blocks_server_takes_the_uncovered_span(tiny_model: Path):
    """A server given only --num_blocks joins where the swarm has no server yet."""
    from tests.swarm import start_swarm

    swarm = start_swarm(tiny_model, ["0:4"])
    try:
        chooser = swarm.add_server(tiny_model, None, num_blocks=4)
        assert (chooser.start_block, chooser.end_block) == (4, 8)
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
    finally:
        swarm.shutdown()


def test_failover_after_prefix_reuse_replays_everything(tiny_model: Path, reference):
    """A session whose prompt came partly from a server's prefix cache loses that server: the client
    rebuilds the chain from its own inputs (the reused positions included) and the output is unchanged."""
    from petals_like import AutoDistributedModelForCausalLM
    from tests.swarm import start_swarm

    swarm = start_swarm(tiny_model, ["0:8", "0:8"])
    try:
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.peers)
        try:
            prompt = torch.randint(4, 300, (1, 37), generator=torch.Generator().manual_seed(5))  # 3 is <pad>
            expected = reference.generate(prompt, max_new_tokens=24, do_sample=False)
            with model.inference_session(max_length=64) as warm:
                model.generate(prompt, max_new_tokens=2, session=warm)  # publishes 2 full pages
            with model.inference_session(max_length=64) as session:
                first = model.generate(prompt, max_new_tokens=12, session=session)
                assert session.reused_tokens == 32
                used = session._chain[0].span.peer_id
                next(s for s in swarm.servers if s.node.peer_id == used).shutdown()
                rest = model.generate(None, max_new_tokens=12, session=session)
                assert session.num_failovers >= 1 and session.reused_tokens == 0
                assert session._chain[0].span.peer_id != used
            assert torch.equal(torch.cat([first, rest], dim=1), expected)
        finally:
            model.shutdown()
    finally:
        swarm.shutdown()


def test_training_step_survives_a_killed_server(dht, servers, tiny_model: Path, reference):
    """SIGKILL the server that ran a forward pass before its backward: the gradients are still right."""
    peers, peer_ids = start_replicated(dht, servers, tiny_model)

    torch.manual_seed(1)
    input_ids = torch.randint(4, 300, (2, 10))
    ref_embeds = reference.model.embed_tokens(input_ids).detach().requires_grad_(True)
    reference(inputs_embeds=ref_embeds, labels=input_ids).loss.backward()

    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=peers, ban_timeout=60)
    try:
        embeds = model.local.embed(input_ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, labels=input_ids)
        used = model.remote.last_trace_peers  # the servers of this forward pass, in order
        victim = servers.servers[peer_ids.index(used[-1])]
        assert victim is not servers.servers[0]
        servers.kill(victim)
        out.loss.backward()  # the killed span is re-run on the replica, then differentiated there
        rel = (embeds.grad - ref_embeds.grad).norm() / ref_embeds.grad.norm()
        assert rel <= 1e-4, f"relative gradient error {rel:.2e}"
    finally:
        model.shutdown()


def test_a_crashed_server_is_pinged_before_it_is_routed_through_again(dht, servers, tiny_model: Path):
    """A SIGKILLed server's records stay ONLINE in the DHT until they expire. Once a ping could not
    reach it, chains are planned around it; once its ban after a failed request is over, the client
    pings it again before routing through it, and bans it if it does not answer: no caller's retry is
    spent on it."""
    peers = dht.visible_maddrs()
    dead, live = servers.add_servers(["0:8", "0:8"])
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=peers, ban_timeout=2.0)
    try:
        routes = model.routes
        wait_until(lambda: model.node.run(routes.refresh(force=True)) or {dead, live} <= set(routes.spans), 30)
        servers.kill(servers.servers[0])

        def route_prefers_the_dead_one() -> list[str]:
            routes.pings.rtts.update({dead: 1e-4, live: 1.0})  # the dead one is the planner's first choice
            return [span.peer_id for span in model.node.run(routes.make_route(0, NUM_BLOCKS))]

        model.node.run(routes.pings.measure(model.node.p2p, [dead], force=True))
        assert dead in routes.pings.unreachable
        sent = routes.pings.sent
        assert route_prefers_the_dead_one() == [live]
        assert dead not in routes.banned() and dead in routes.avoided() and routes.pings.sent == sent  # no more pings

        routes.pings.unreachable.clear()  # as if its latest ping had answered
        routes.pings.unanswered.clear()
        routes.ban(dead, "a request failed")
        wait_until(lambda: dead not in routes.banned(), 10)  # a failure on record, its ban over
        assert route_prefers_the_dead_one() == [live]
        assert dead in routes.banned() and routes.pings.sent == sent + 1
    finally:
        model.shutdown()
