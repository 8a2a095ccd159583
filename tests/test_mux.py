"""One mux stream per client and server (client/mux.py, server/mux.py) on a real 2-server swarm:
concurrent sessions' steps travel in one message per round and stay exact and isolated."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hivemind.p2p import P2PHandlerError

from petals_like import AutoDistributedModelForCausalLM
from petals_like.dht.records import default_dht_prefix
from petals_like.protocol import ErrorCode, refusal_code
from petals_like.wire import Step
from tests.swarm import Swarm, start_swarm, wait_until

NUM_BLOCKS = 8
SESSIONS = 16
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def swarm(tiny_model: Path) -> Iterator[Swarm]:
    swarm = start_swarm(tiny_model, ["0:4", "4:8"])
    try:
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
        yield swarm
    finally:
        swarm.shutdown()


def mux_counters(swarm: Swarm) -> list[tuple[int, int]]:
    """(mux messages, mux steps) each server received so far."""
    return [(s.handlers.mux_messages_received, s.handlers.mux_steps_received) for s in swarm.servers]


@pytest.mark.parametrize("use_push", [True, False], ids=["push", "relay"])
def test_sixteen_sessions_are_exact_and_send_one_message_per_server_per_round(swarm, tiny_model, reference, use_push):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_model, initial_peers=swarm.peers, torch_dtype="float32", use_push=use_push
    )
    prompts = [torch.randint(4, 300, (1, 4 + i % 5), generator=torch.Generator().manual_seed(i)) for i in range(SESSIONS)]
    expected = [reference.generate(p, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None) for p in prompts]
    outputs: list = [None] * SESSIONS

    def run(i: int) -> None:
        with model.inference_session(max_length=32, reuse_prefix=False) as session:
            outputs[i] = model.generate(prompts[i], max_new_tokens=NEW_TOKENS, session=session, eos_token_id=[])

    first = swarm.servers[0].scheduler
    before = mux_counters(swarm)
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(SESSIONS)]
        with first.hold():  # the prompts line up, so every later round is one round of all sessions
            for t in threads:
                t.start()
            wait_until(lambda: first.num_pending == SESSIONS, 60, message="every prompt queued")
        for t in threads:
            t.join(120)
        for i, (out, exp) in enumerate(zip(outputs, expected)):
            assert out is not None and torch.equal(out, exp), f"session {i} differs from transformers"
        counters = model.remote.muxes.counters()
        sent = {peer: (messages, steps) for peer, (messages, steps, _) in counters.items()}
        received = [(m - m0, s - s0) for (m, s), (m0, s0) in zip(mux_counters(swarm), before)]
    finally:
        model.shutdown()
    rounds = NEW_TOKENS  # the prompt, then one step per new token but the last
    first_peer, second_peer = (server.node.peer_id for server in swarm.servers)
    # a session's first step goes on its own stream, behind its open message; after that, every
    # session's step of a round travels in one message (two at most, when a round straddles a loop
    # turn), whatever the server
    assert received[0][1] == SESSIONS * (rounds - 1)
    assert rounds - 1 <= received[0][0] <= 2 * (rounds - 1), received
    assert sent[first_peer] == received[0]
    if use_push:  # the first server pushes: the client sends the second nothing
        assert received[1] == (0, 0) and sent.get(second_peer, (0, 0)) == (0, 0), (received, sent)
    else:
        assert received[1][1] == SESSIONS * (rounds - 1) and received[1][0] <= 2 * (rounds - 1), received
    # and the answers of a round come back in one message per server, pushed steps' answers included
    answers = {peer: answered for peer, (_, _, answered) in counters.items()}
    assert all(rounds <= answers[peer] <= 2 * rounds for peer in (first_peer, second_peer)), answers


def test_a_bad_step_fails_only_its_own_session(swarm, model):
    """Two sessions share the mux to each server; one sends a malformed step (wrong hidden size) in
    the same message as the other's good step: only the first fails, and the second goes on exactly."""
    prompt = torch.randint(4, 300, (1, 6), generator=torch.Generator().manual_seed(7))
    hidden = model.local.embed(prompt)
    with model.inference_session(max_length=16) as clean:
        expected = clean.step(hidden)
    bad, good = model.inference_session(max_length=16), model.inference_session(max_length=16)
    with bad, good:
        good.step(hidden[:, :3])
        bad.step(hidden[:, :3])
        open_before = sum(len(s.sessions.sessions) for s in swarm.servers)
        link = bad._chain[0]
        assert link.stream.mux is good._chain[0].stream.mux is not None

        async def both() -> tuple[BaseException, torch.Tensor]:
            await link.stream.send_step(torch.zeros(1, 1, 5), Step(link.session_id, position=3))
            good_out = asyncio.ensure_future(good.astep(hidden[:, 3:5]))  # queued in the same loop turns
            try:
                await link.stream.read_step(3, timeout=30)
            except P2PHandlerError as e:
                return e, await good_out
            raise AssertionError("the malformed step was answered")

        before = mux_counters(swarm)[0]
        error, out = model.node.run(both(), timeout=60)
        assert refusal_code(error) is ErrorCode.BAD_REQUEST, error
        after = mux_counters(swarm)[0]
        assert (after[0] - before[0], after[1] - before[1]) == (1, 2)  # one message carried both steps
        torch.testing.assert_close(out, expected[:, 3:5], rtol=1e-4, atol=1e-4)
        out = good.step(hidden[:, 5:6])  # the good session goes on
        torch.testing.assert_close(out, expected[:, 5:6], rtol=1e-4, atol=1e-4)
        wait_until(
            lambda: sum(len(s.sessions.sessions) for s in swarm.servers) == open_before - 1,
            10,
            message="the failed session closed on its server",
        )


def test_a_mux_reaches_only_sessions_its_peer_opened_on_it(swarm, model, tiny_model):
    """Another client's session id, named on this client's mux, is refused for that step alone."""
    other = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.peers, torch_dtype="float32")
    try:
        hidden = model.local.embed(torch.randint(4, 300, (1, 4), generator=torch.Generator().manual_seed(3)))
        with other.inference_session(max_length=8) as victim, model.inference_session(max_length=8) as mine:
            victim.step(hidden[:, :2])
            mine.step(hidden[:, :2])
            target = victim._chain[0]
            own = mine._chain[0].stream

            async def steal() -> BaseException:
                mux = own.mux
                mux.add(target.session_id)
                try:
                    mux.send(Step(target.session_id, position=2), hidden[:, 2:3])
                    try:
                        await mux.receive(target.session_id)
                    except P2PHandlerError as e:
                        return e
                    raise AssertionError("a step reached another peer's session")
                finally:
                    mux.remove(target.session_id)

            error = model.node.run(steal(), timeout=30)
            assert "was not opened on this mux stream by this peer" in str(error)
            assert victim._chain[0].stream.mux is not own.mux
            victim.step(hidden[:, 2:4])  # untouched: its next step follows its first
            mine.step(hidden[:, 2:4])
            assert victim.position == mine.position == 4
    finally:
        other.shutdown()


def test_a_refused_open_is_answered_on_the_mux(swarm, model):
    """A session whose open the server refuses (here: too many rows) never exists there; the client,
    which reads that session's answers on the mux, gets the refusal there instead of waiting."""
    from petals_like.client.transport import InferenceStream
    from petals_like.data_structures import RemoteSpanInfo, ServerInfo, ServerState
    from petals_like.wire import OpenSession

    server = swarm.servers[0]
    span = RemoteSpanInfo(server.node.peer_id, 0, 4, ServerInfo(ServerState.ONLINE, 0, 4))
    too_many = server.config.max_batch_size + 1

    async def run() -> BaseException:
        mux = await model.remote.muxes.get(span.peer_id, None, timeout=10)
        stream = InferenceStream(model.node.p2p, span, mux=mux)
        await stream.open(timeout=10)
        stream.attach("refused-session")
        request = OpenSession("refused-session", 0, 4, max_length=8, batch_size=too_many, mux=mux.mux_id)
        await stream.send([], request.to_meta())
        try:  # the refusal may come as the step is sent (the stream is closed by then) or as its answer
            await stream.send_step(torch.zeros(too_many, 1, 64), Step("refused-session", position=0))
            await stream.read_step(0, timeout=10)
        except P2PHandlerError as e:
            return e
        finally:
            await stream.close()
        raise AssertionError("a refused session answered a step")

    error = model.node.run(run(), timeout=30)
    assert refusal_code(error) is ErrorCode.SERVER_LIMIT and "batch_size" in str(error)


def test_a_server_without_the_mux_handler_gets_each_sessions_steps_on_its_own_stream(tiny_model, reference, monkeypatch):
    """A swarm mixing an older server (no rpc_inference_mux) with a current one: the client muxes
    only where it can, and the tokens are the same."""
    from petals_like.protocol import RPC_INFERENCE_MUX
    from petals_like.server.handler import Handlers

    register = Handlers.register

    async def register_as_an_older_version(self, p2p):
        add = p2p.add_protobuf_handler

        async def all_but_the_mux(name, *args, **kwargs):
            if name != RPC_INFERENCE_MUX:
                await add(name, *args, **kwargs)

        p2p.add_protobuf_handler = all_but_the_mux
        try:
            await register(self, p2p)
        finally:
            del p2p.add_protobuf_handler

    prompt = torch.randint(4, 300, (1, 5), generator=torch.Generator().manual_seed(11))
    expected = reference.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    mixed = start_swarm()
    try:
        monkeypatch.setattr(Handlers, "register", register_as_an_older_version)
        old = mixed.add_server(tiny_model, "0:4")
        monkeypatch.setattr(Handlers, "register", register)
        new = mixed.add_server(tiny_model, "4:8")
        mixed.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            tiny_model, initial_peers=mixed.peers, torch_dtype="float32", use_push=False
        )
        try:
            assert torch.equal(model.generate(prompt, max_new_tokens=10), expected)
        finally:
            model.shutdown()
        assert old.handlers.mux_messages_received == 0 and old.handlers.stream_steps_received == 10
        assert new.handlers.mux_steps_received == 9 and new.handlers.stream_steps_received == 1
    finally:
        mixed.shutdown()


def test_a_client_gets_a_few_mux_streams_per_server_not_more(swarm, model):
    from petals_like.client.mux import StepMux
    from petals_like.server.mux import MAX_MUXES_PER_PEER

    server = swarm.servers[1]

    def open_here() -> int:
        return sum(peer == model.node.peer_id for peer, _ in server.handlers.muxes)

    async def run() -> BaseException:
        opened = [StepMux(model.node.p2p, server.node.peer_id, None) for _ in range(MAX_MUXES_PER_PEER - open_here())]
        try:
            for mux in opened:  # up to the limit (the client's own mux here counts)
                await mux.open(timeout=10)
            try:
                await StepMux(model.node.p2p, server.node.peer_id, None).open(timeout=10)
            except P2PHandlerError as e:
                return e
            raise AssertionError("a mux beyond the limit was opened")
        finally:
            for mux in opened:
                mux.abort()

    error = model.node.run(run(), timeout=60)
    assert refusal_code(error) is ErrorCode.SERVER_LIMIT and "mux streams" in str(error)
    wait_until(lambda: open_here() < MAX_MUXES_PER_PEER, 10, message="the test's muxes closed on the server")
