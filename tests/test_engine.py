"""The server engine on real swarms: continuous batching, paged pool accounting, prefix reuse."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import torch
from hivemind.p2p import P2PHandlerError

from petals_like import AutoDistributedModelForCausalLM
from petals_like.client.prefix import PrefixTracker
from petals_like.client.transport import InferenceStream, RequestRefused
from petals_like.data_structures import RemoteSpanInfo, ServerInfo, ServerState
from petals_like.dht.records import default_dht_prefix
from tests.swarm import Swarm, start_swarm, wait_until

NUM_BLOCKS = 8


@pytest.fixture(scope="module")
def swarm(tiny_model: Path) -> Iterator[Swarm]:
    swarm = start_swarm(tiny_model, ["0:8"], kv_cache_tokens=4096, page_size=16, max_alloc_timeout=0.2)
    try:
        swarm.wait_for_blocks(default_dht_prefix(tiny_model), NUM_BLOCKS)
        yield swarm
    finally:
        swarm.shutdown()


def server_of(swarm: Swarm):
    return swarm.servers[0]


def all_pages_back(swarm: Swarm) -> bool:
    pool = server_of(swarm).sessions.pool
    index = server_of(swarm).sessions.prefix_index
    return pool.num_free + len(index) == pool.num_pages and not server_of(swarm).sessions.sessions


def test_concurrent_sessions_are_batched_and_exact(swarm, model, reference):
    prompts = [torch.randint(4, 300, (1, n), generator=torch.Generator().manual_seed(n)) for n in range(3, 19, 2)]  # 3 is <pad>
    expected = [reference.generate(p, max_new_tokens=32, do_sample=False, eos_token_id=None) for p in prompts]
    outputs: list = [None] * len(prompts)

    def run(i: int) -> None:
        with model.inference_session(max_length=64, reuse_prefix=False) as session:
            outputs[i] = model.generate(prompts[i], max_new_tokens=32, session=session, eos_token_id=[])

    scheduler = server_of(swarm).scheduler
    sizes: list[int] = []
    scheduler.on_iteration = lambda chosen: sizes.append(len(chosen))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    try:
        with scheduler.hold():  # the 8 prompts queue up: the first iteration must take them all
            for t in threads:
                t.start()
            wait_until(lambda: scheduler.num_pending == len(prompts), 60, message="every prompt queued")
        for t in threads:
            t.join(120)
    finally:
        scheduler.on_iteration = None
    for i, (out, exp) in enumerate(zip(outputs, expected)):
        differ = (out != exp).nonzero()
        assert torch.equal(out, exp), f"session {i} (prompt {prompts[i].shape[1]}) differs from position {differ[:1].tolist()}"
    # the later steps come back at times the network decides; only the lined-up first one is certain
    assert sizes[0] == len(prompts), sizes
    wait_until(lambda: all_pages_back(swarm), 10, message="pages returned")


async def open_raw(swarm: Swarm, client_node) -> tuple[InferenceStream, str]:
    """An open inference stream to the server, bypassing the client library, and a fresh session id."""
    server = server_of(swarm)
    span = RemoteSpanInfo(server.node.peer_id, 0, NUM_BLOCKS, ServerInfo(ServerState.ONLINE, 0, NUM_BLOCKS))
    stream = InferenceStream(client_node.p2p, span)
    await stream.open(timeout=10)
    return stream, uuid.uuid4().hex


def open_meta(sid: str, max_length: int = 512, **extra) -> dict:
    return {"session_id": sid, "start": 0, "end": NUM_BLOCKS, "max_length": max_length, "batch_size": 1, **extra}


def test_abrupt_disconnects_return_every_page(swarm, model):
    node = model.node

    async def abandon(prefill: int) -> None:
        stream, sid = await open_raw(swarm, node)
        await stream.send([torch.randn(1, prefill, 64)], open_meta(sid))
        await asyncio.sleep(0.001 * (prefill % 5))
        stream.abort()  # no close message, no end of stream: the client just vanishes

    async def complete() -> None:
        stream, sid = await open_raw(swarm, node)
        await stream.step(torch.randn(1, 20, 64), open_meta(sid), timeout=30)
        for _ in range(3):
            await stream.step(torch.randn(1, 1, 64), {"session_id": sid}, timeout=30)
        await stream.close({"session_id": sid})

    async def run_all() -> None:
        await asyncio.gather(*[abandon(n) for n in range(40, 200, 10)], *[complete() for _ in range(4)])

    node.run(run_all(), timeout=120)
    wait_until(lambda: all_pages_back(swarm), 20, message="every page back in the pool")


def test_exhausted_pool_fails_only_the_session_that_needs_pages(swarm, model):
    pool = server_of(swarm).sessions.pool
    node = model.node

    async def run() -> str:
        good, good_id = await open_raw(swarm, node)
        await good.step(torch.randn(1, 8, 64), open_meta(good_id), timeout=30)
        hog, hog_id = await open_raw(swarm, node)
        too_many = pool.num_free * pool.page_size + pool.page_size  # one page more than is free
        try:
            await hog.step(torch.randn(1, too_many, 64), open_meta(hog_id, max_length=too_many + 1), timeout=60)
        except P2PHandlerError as e:
            error = str(e)
        else:
            error = ""
        for _ in range(3):  # the other session goes on
            out = await good.step(torch.randn(1, 1, 64), {"session_id": good_id}, timeout=30)
            assert out.shape == (1, 1, 64)
        await good.close({"session_id": good_id})
        return error

    error = node.run(run(), timeout=120)
    assert "KV cache" in error and "retry" in error
    wait_until(lambda: all_pages_back(swarm), 10)


def test_prefix_reuse_is_exact_and_skips_the_shared_pages(swarm, model, reference):
    torch.manual_seed(3)
    prompt = torch.randint(4, 300, (1, 53))  # 3 full pages of 16 + 5 tokens
    expected = reference.generate(prompt, max_new_tokens=8, do_sample=False)
    stats = server_of(swarm).scheduler.stats

    with model.inference_session(max_length=80) as first:
        before = stats.inference_tokens
        assert torch.equal(model.generate(prompt, max_new_tokens=8, session=first), expected)
        first_tokens = stats.inference_tokens - before
    with model.inference_session(max_length=80) as second:
        before = stats.inference_tokens
        assert torch.equal(model.generate(prompt, max_new_tokens=8, session=second), expected)
        second_tokens = stats.inference_tokens - before
        assert second.reused_tokens == 48
    assert second_tokens == first_tokens - 48
    assert server_of(swarm).sessions.prefix_index.hits >= 1


def test_prefix_pages_never_cross_clients_or_salts(swarm, model, tiny_model, reference):
    torch.manual_seed(4)
    prompt = torch.randint(4, 300, (1, 40))
    with model.inference_session(max_length=64) as session:
        model.generate(prompt, max_new_tokens=2, session=session)
    other = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.peers)
    try:
        with other.inference_session(max_length=64) as session:
            out = other.generate(prompt, max_new_tokens=4, session=session)
            assert session.reused_tokens == 0  # another peer id: another scope
        assert torch.equal(out, reference.generate(prompt, max_new_tokens=4, do_sample=False))
    finally:
        other.shutdown()
    salted = model.inference_session(max_length=64)
    salted.prefix = PrefixTracker("another adapter")  # as a session through another adapter would name its pages
    with salted:
        model.generate(prompt, max_new_tokens=2, session=salted)
        assert salted.reused_tokens == 0


def test_a_session_id_is_reachable_only_through_its_stream(swarm, model):
    node = model.node

    async def run() -> list[str]:
        errors = []
        owner, sid = await open_raw(swarm, node)
        await owner.step(torch.randn(1, 4, 64), open_meta(sid), timeout=30)
        thief, _ = await open_raw(swarm, node)
        for meta in (open_meta(sid), {"session_id": sid}):
            try:
                await thief.step(torch.randn(1, 1, 64), meta, timeout=30)
            except P2PHandlerError as e:
                errors.append(str(e))
            thief, _ = await open_raw(swarm, node)
        # the owner's session is untouched: its next step follows its first
        await owner.send([torch.randn(1, 1, 64)], {"session_id": sid, "position": 4})
        reply, _ = await owner.read_step(4, timeout=30)
        await owner.close({"session_id": sid})
        return errors + [reply.step]

    errors = node.run(run(), timeout=60)
    assert "already open" in errors[0]
    # a step naming a live session on another stream is no open message: refused as such
    assert "[bad_request] metadata field 'start' is missing" in errors[1]
    assert errors[2] == 2


def test_record_announces_free_cache_and_sessions(swarm, model, tiny_model):
    from petals_like.dht.announce import get_block_infos

    server = server_of(swarm)
    prefix = default_dht_prefix(tiny_model)
    total = server.sessions.pool.num_pages * server.sessions.pool.page_size

    def announced():
        server.node.run(server.announcer.declare(ServerState.ONLINE))
        infos = swarm.dht.run(get_block_infos(swarm.dht.dht, prefix, [0]))
        return infos[0][server.node.peer_id]

    with model.inference_session(max_length=64, reuse_prefix=False) as session:
        announced()  # the load announced next covers the time from here
        session.step(model.local.embed(torch.randint(4, 300, (1, 40))))
        info = announced()
        assert info.open_sessions == 1
        assert info.cache_tokens_left <= total - 48  # 40 tokens hold 3 pages of 16
        assert info.load > 0  # the compute thread ran the prompt since the previous announcement
        assert announced().load == 0  # and nothing since
    wait_until(lambda: announced().open_sessions == 0, 10)


def test_a_prompt_chunk_waits_for_decoders_due_back_instead_of_running_alone():
    """DecodePace, on made-up times: a prompt-only iteration that would still run when the decoding
    sessions are back is held for them (bounded); one that fits before they are back is not."""
    from petals_like.server.scheduler import MAX_DECODE_WAIT, DecodePace

    pace = DecodePace()
    assert pace.hold_until(100.0) == 0.0  # nothing learned yet
    pace.observe([10.0], prompt_only=False, started=10.0, ended=10.02)  # decoders ran, done at 10.02
    pace.observe([10.12], prompt_only=False, started=10.12, ended=10.14)  # back after 0.1 s
    assert pace.decode_gap == pytest.approx(0.1)
    pace.observe([], prompt_only=True, started=10.14, ended=10.2)  # a prompt chunk alone takes 60 ms
    assert pace.prompt_only == pytest.approx(0.06)
    # decoders due back at 10.24: a 60 ms chunk starting at 10.2 would still run; hold it until they are
    # back, and at most a quarter of the gap longer
    assert pace.hold_until(10.2) == pytest.approx(10.24 + 0.025)
    assert pace.hold_until(10.14) == 0.0  # a chunk starting at once fits before they are back
    assert pace.hold_until(10.5) == 0.0  # long overdue: they are not coming back soon
    pace.observe([15.0], prompt_only=False, started=15.0, ended=15.0)  # a slow client: the gap grows to ~1.5 s
    for _ in range(10):  # and long prompt chunks: 1 s each
        pace.observe([], prompt_only=True, started=0.0, ended=1.0)
    assert pace.hold_until(16.0) == pytest.approx(16.0 + MAX_DECODE_WAIT)  # never longer than MAX_DECODE_WAIT


def test_a_request_every_server_would_refuse_is_raised_at_once_and_blames_no_server(swarm, model):
    """A refusal coded bad_request is the caller's bug: the client raises it instead of banning the
    server, retrying elsewhere and replaying (which would fail on every server in turn)."""
    nan = torch.full((1, 2, 64), float("nan"))
    bans, failovers = dict(model.routes.ban_reasons), []
    with model.inference_session(max_length=8) as session:
        with pytest.raises(RequestRefused, match=r"refused the request: .*\[bad_request\] hidden_states contains NaN"):
            session.step(nan)
        failovers.append(session.num_failovers)
    with pytest.raises(RequestRefused, match="contains NaN"):
        model.remote.forward(nan)
    assert model.routes.ban_reasons == bans and failovers == [0]
    with model.inference_session(max_length=8) as session:  # and the server serves this client on
        assert session.step(torch.empty(1, 0, 64)).shape == (1, 0, 64)  # zero tokens: zero outputs, as in Petals
        assert session.step(torch.randn(1, 2, 64)).isfinite().all()
        assert session.step(torch.empty(1, 0, 64)).shape == (1, 0, 64) and session.position == 2
