"""Routing on real local swarms: push, slow replicas, load spreading, fail-over in training."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from petals_like import AutoDistributedModelForCausalLM
from petals_like.client.transport import InferenceStream
from petals_like.dht.records import default_dht_prefix
from petals_like.wire import InfoReply, call_info
from tests.swarm import start_swarm, wait_until

NUM_BLOCKS = 8


def client(tiny_model: Path, swarm, **kwargs):
    return AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.peers, torch_dtype="float32", **kwargs)


def server_info(model, peer: str) -> InfoReply:
    return model.node.run(call_info(model.node.p2p, peer, timeout=10), timeout=20)


@pytest.fixture(scope="module")
def chain_swarm(tiny_model: Path):
    swarm = start_swarm(tiny_model, ("0:3", "3:5", "5:8"))
    try:
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
        yield swarm
    finally:
        swarm.shutdown()


def test_push_skips_the_client_between_servers(chain_swarm, tiny_model: Path, reference):
    input_ids = torch.tensor([[1, 33, 34, 35, 36]])
    expected = reference.generate(input_ids, max_new_tokens=24, do_sample=False)
    sent = {}
    for use_push in (True, False):
        model = client(tiny_model, chain_swarm, use_push=use_push)
        try:
            before = {s.node.peer_id: server_info(model, s.node.peer_id).pushes_received for s in chain_swarm.servers}
            with model.inference_session(max_length=32) as session:
                assert torch.equal(model.generate(input_ids, max_new_tokens=24, session=session), expected)
                assert len(session._chain) == 3
                sent[use_push] = [link.stream.messages_sent for link in session._chain]
                peers = [link.span.peer_id for link in session._chain]
            received = [server_info(model, p).pushes_received - before[p] for p in peers]
        finally:
            model.shutdown()
        if use_push:
            # 24 steps: every one reached the 2nd and 3rd servers by push, none through the client
            assert received[0] == 0 and received[1] >= 23 and received[2] >= 23
        else:
            assert received == [0, 0, 0]
    # the open message only, vs. the open message plus every step
    assert sent[True][1:] == [1, 1] and sent[False][1] >= 24 and sent[False][2] >= 24
    assert sent[True][0] == sent[False][0]


def test_pushes_of_one_iteration_travel_together(chain_swarm, tiny_model: Path, reference):
    """Sessions that share a chain are batched together, so each server pushes their outputs to the
    next one in one message per iteration, not one per session; every output stays exact."""
    prompts = [torch.tensor([[1, 40 + i, 50 + i, 60 + i]]) for i in range(6)]
    expected = [reference.generate(p, max_new_tokens=12, do_sample=False) for p in prompts]
    model = client(tiny_model, chain_swarm)
    try:
        peers = [s.node.peer_id for s in chain_swarm.servers]
        before = {p: server_info(model, p) for p in peers}
        outputs: list = [None] * len(prompts)
        barrier = threading.Barrier(len(prompts))

        def run(i: int) -> None:
            with model.inference_session(max_length=20) as session:
                barrier.wait()
                outputs[i] = model.generate(prompts[i], max_new_tokens=12, session=session)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        after = {p: server_info(model, p) for p in peers}
    finally:
        model.shutdown()
    for i, (out, exp) in enumerate(zip(outputs, expected)):
        assert out is not None and torch.equal(out, exp), f"session {i} differs"
    pushes = sum(after[p].pushes_sent - before[p].pushes_sent for p in peers)
    assert pushes >= 6 * 12 * 2 - 12, pushes  # 6 sessions x 12 steps x 2 hops, all but the prompt's maybe
    for p in peers[:2]:
        # the pushes an iteration makes to the next server leave in one message (how many iterations the
        # sessions' steps took depends on when they arrived; tests/test_push.py checks the batcher alone)
        messages = after[p].push_messages_sent - before[p].push_messages_sent
        iterations = after[p].iterations - before[p].iterations
        assert 0 < messages <= iterations, (messages, iterations)


def test_failed_push_falls_back_to_the_client(chain_swarm, tiny_model: Path, reference, monkeypatch):
    """A server that cannot reach the next one answers pushed=false; the client relays, outputs unchanged."""
    for server in chain_swarm.servers:
        monkeypatch.setattr(server.handlers.config, "push_timeout", 1e-6)  # every push times out
    input_ids = torch.tensor([[1, 40, 41]])
    model = client(tiny_model, chain_swarm)
    try:
        with model.inference_session(max_length=20) as session:
            got = model.generate(input_ids, max_new_tokens=12, session=session)
            assert [link.stream.messages_sent for link in session._chain][1:] == [13, 13]  # open + 12 relayed steps
        assert torch.equal(got, reference.generate(input_ids, max_new_tokens=12, do_sample=False))
    finally:
        model.shutdown()


def test_chain_avoids_the_replica_behind_a_slow_link(tiny_model: Path, reference, monkeypatch):
    swarm = start_swarm(tiny_model, ("0:4", "0:4", "4:8", "4:8"))
    try:
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
        slow = {swarm.servers[0].node.peer_id, swarm.servers[3].node.peer_id}

        # the test's transport: 80 ms more on every exchange with the slow replicas (pings and steps)
        original_info, original_send = call_info, InferenceStream.send

        async def slow_info(p2p, peer_id, *, timeout):
            if peer_id in slow:
                await asyncio.sleep(0.08)
            return await original_info(p2p, peer_id, timeout=timeout)

        async def slow_send(self, tensors, metadata, **kwargs):
            if self.span.peer_id in slow:
                await asyncio.sleep(0.08)
            return await original_send(self, tensors, metadata, **kwargs)

        monkeypatch.setattr("petals_like.routing.pings.call_info", slow_info)
        monkeypatch.setattr(InferenceStream, "send", slow_send)
        model = client(tiny_model, swarm)
        try:
            input_ids = torch.tensor([[1, 50, 51, 52]])
            with model.inference_session(max_length=16) as session:
                got = model.generate(input_ids, max_new_tokens=8, session=session)
                chosen = {link.span.peer_id for link in session._chain}
            assert not chosen & slow and len(chosen) == 2
            assert model.routes.pings.rtts[next(iter(slow))] > 0.08
            assert torch.equal(got, reference.generate(input_ids, max_new_tokens=8, do_sample=False))
        finally:
            model.shutdown()
    finally:
        swarm.shutdown()


def test_forward_load_spreads_over_equal_replicas(tiny_model: Path, monkeypatch):
    """Every forward call draws its chain (planner.make_training_route) weighted by throughput and
    load; the draws are seeded here, so the split is the same on every run (tests/test_planner.py
    checks the distribution itself over many draws)."""
    import random
    import types

    from petals_like.routing import planner

    seeded = random.Random(0)  # one stream for all clients: their calls run one after another
    monkeypatch.setattr(planner, "random", types.SimpleNamespace(Random=lambda: seeded))
    swarm = start_swarm(tiny_model, ("0:8", "0:8"))
    clients = []
    try:
        prefix = default_dht_prefix(tiny_model)
        # both replicas announced, not just the blocks covered: a client that saw only the first
        # would send it everything until its next refresh of the swarm view
        wait_until(lambda: len(swarm.spans(prefix, NUM_BLOCKS)) == 2, 30, message="both replicas announced")
        clients = [client(tiny_model, swarm) for _ in range(8)]
        for model in clients:
            model.node.run(model.routes.refresh(force=True), timeout=30)
            assert len(model.routes.spans) == 2
        input_ids = torch.randint(4, 300, (1, 12), generator=torch.Generator().manual_seed(0))
        for _ in range(5):
            for model in clients:
                model(input_ids)
        calls = [server.handlers.forward_calls for server in swarm.servers]
        assert sum(calls) == 40
        assert all(0.3 <= c / 40 <= 0.7 for c in calls), calls  # 15 : 25 with equal weights and this seed
    finally:
        for model in clients:
            model.shutdown()
        swarm.shutdown()


@pytest.mark.parametrize("big_throughput, expected_hops", [(2000.0, 1), (20.0, 3)])
def test_one_span_or_three_hops_whichever_is_faster(tiny_model: Path, reference, big_throughput, expected_hops):
    """A server with all 8 blocks vs three with 3 + 2 + 3 blocks at 400 block-steps/s (20 ms in all).

    At 2000 block-steps/s the big server needs 4 ms and one link: it wins. At 20 it needs 400 ms:
    three hops win. Loopback links cost a few ms, far from either margin.
    """
    swarm = start_swarm()
    try:
        swarm.add_server(tiny_model, "0:8", throughput=big_throughput)
        for span in ("0:3", "3:5", "5:8"):
            swarm.add_server(tiny_model, span, throughput=400.0)
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
        wait_for = {s.node.peer_id for s in swarm.servers}
        model = client(tiny_model, swarm)
        try:
            from tests.swarm import wait_until

            def all_seen() -> bool:
                model.node.run(model.routes.refresh(force=True), timeout=30)
                return wait_for <= set(model.routes.spans)

            wait_until(all_seen, 30, message="the client sees all four servers")
            input_ids = torch.tensor([[1, 70, 71]])
            with model.inference_session(max_length=12) as session:
                got = model.generate(input_ids, max_new_tokens=6, session=session)
                hops = len(session._chain)
            assert hops == expected_hops
            assert torch.equal(got, reference.generate(input_ids, max_new_tokens=6, do_sample=False))
        finally:
            model.shutdown()
    finally:
        swarm.shutdown()


def test_servers_announce_round_trips_to_the_servers_that_follow_them(chain_swarm, tiny_model: Path):
    from petals_like.data_structures import ServerState

    first, second, third = sorted(chain_swarm.servers, key=lambda s: s.start_block)
    for server in (first, second):
        server.node.run(server.announcer.declare(ServerState.ONLINE), timeout=30)  # a re-announcement, now
    spans = chain_swarm.spans(default_dht_prefix(tiny_model), NUM_BLOCKS)
    pings = {peer: span.server_info.next_pings for peer, span in spans.items()}
    assert set(pings[first.node.peer_id]) == {second.node.peer_id}  # only servers that can follow 0:3
    assert set(pings[second.node.peer_id]) == {third.node.peer_id}
    assert 0 < pings[first.node.peer_id][second.node.peer_id] < 1.0
    assert pings[third.node.peer_id] == {}  # nothing follows the last block
