"""What a Petals user's code does, on a real swarm: rolling a session back, empty steps, and the rest of
Petals' client surface, each checked against local transformers or a fresh session."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.swarm import Swarm, running_swarm

NUM_BLOCKS = 8
HIDDEN = 64
PAGE = 16


@pytest.fixture(scope="module")
def swarm(tiny_model: Path) -> Iterator[Swarm]:
    with running_swarm(tiny_model, ["0:4", "4:8"], page_size=PAGE) as swarm:
        yield swarm


def server_rows(swarm: Swarm, session) -> list[list]:
    """The server-side page tables of each link of the session's chain (row 0 of each)."""
    by_peer = {server.node.peer_id: server for server in swarm.servers}
    return [by_peer[link.span.peer_id].sessions.sessions[link.session_id].sequences[0] for link in session._chain]


def steps(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, HIDDEN, generator=gen) for n in lengths]


def test_rolling_back_equals_a_fresh_session_and_frees_the_pages(swarm, model):
    prompt, a, b, after = steps(40, 5, 3, 4)
    with model.inference_session(max_length=64) as session:
        session.step(prompt)
        session.step(a)
        session.step(b)
        assert session.position == 48 and [row.length for row in server_rows(swarm, session)] == [48, 48]
        pools = [server.sessions.pool for server in swarm.servers]
        free = [pool.num_free for pool in pools]
        session.position = 20  # Petals' rollback: keep the first 20 tokens
        assert session.position == 20
        got = session.step(after)
        rows = server_rows(swarm, session)
        assert [row.length for row in rows] == [24, 24] and [len(row.pages) for row in rows] == [2, 2]
        assert [pool.num_free for pool in pools] == [n + 1 for n in free]  # 3 pages -> 2 on each server
    with model.inference_session(max_length=64) as fresh:
        fresh.step(prompt[:, :20])
        want = fresh.step(after)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()


def test_only_a_rollback_may_be_assigned_to_position(model):
    with model.inference_session(max_length=16) as session:
        session.step(torch.randn(1, 4, HIDDEN))
        with pytest.raises(ValueError, match=r"only be rolled back: position must be in \[0, 4\], got 5"):
            session.position = 5
        with pytest.raises(ValueError):
            session.position = -1
        with pytest.raises(TypeError):
            session.position = 2.0
        assert session.position == 4
        session.position = 4  # no change: nothing is sent
        assert session.step(torch.randn(1, 1, HIDDEN)).shape == (1, 1, HIDDEN) and session.position == 5


def test_generation_continues_exactly_after_a_rollback(model, reference):
    input_ids = torch.tensor([[1, 20, 21, 22, 23]])
    expected = reference.generate(input_ids, max_new_tokens=12, do_sample=False)
    n = input_ids.shape[1]
    with model.inference_session(max_length=32) as session:
        first = model.generate(input_ids, max_new_tokens=12, session=session)
        assert torch.equal(first, expected)
        session.position = n + 3  # back to the prompt and the first 3 new tokens
        with pytest.raises(ValueError, match="input_ids are required"):
            model.generate(None, max_new_tokens=1, session=session)
        again = model.generate(expected[:, n + 3 : n + 4], max_new_tokens=8, session=session)
    assert torch.equal(again[:, 1:], expected[:, n + 4 : n + 12])


def test_rollback_below_a_reused_prefix_and_after_it(swarm, model):
    """Prefix pages cached by one session and reused by the next: rolling the second one back into a
    shared page gives it its own copy, and the cached prefix stays intact for a third session."""
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(4, 300, (1, 40), generator=gen)
    embeds = model.local.embed(tokens)
    with model.inference_session(max_length=64) as first:
        full = first.step(embeds, token_ids=tokens)
    with model.inference_session(max_length=64) as second:
        second.step(embeds, token_ids=tokens)
        assert second.reused_tokens == 32
        second.position = 20  # inside the second shared page
        other = torch.randint(4, 300, (1, 6), generator=gen)
        got = second.step(model.local.embed(other), token_ids=other)
    with model.inference_session(max_length=64, reuse_prefix=False) as fresh:
        want = fresh.step(torch.cat([embeds[:, :20], model.local.embed(other)], dim=1))[:, 20:]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    with model.inference_session(max_length=64) as third:  # the cache still holds the first prompt's pages
        again = third.step(embeds, token_ids=tokens)
        assert third.reused_tokens == 32
    assert torch.allclose(again[:, 32:], full[:, 32:], rtol=1e-5, atol=1e-4)


@pytest.fixture
def replicated(tiny_model: Path) -> Iterator[tuple[Swarm, object]]:
    """A swarm with two servers for blocks 0:4 (a test may stop one) and a client of it."""
    from petals_like import AutoDistributedModelForCausalLM

    with running_swarm(tiny_model, ["0:4", "0:4", "4:8"], page_size=PAGE) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, initial_peers=swarm.peers, torch_dtype="float32")
        try:
            yield swarm, model
        finally:
            model.shutdown()


def stop_first_server(swarm: Swarm, session) -> None:
    """Stop the server of the session's first span: its next step finds it gone."""
    next(s for s in swarm.servers if s.node.peer_id == session._chain[0].span.peer_id).shutdown()


def test_failover_after_a_rollback_replays_the_rolled_back_history(replicated):
    swarm, model = replicated
    prompt, a, after = steps(30, 6, 5, seed=1)
    with model.inference_session(max_length=64) as session:
        session.step(prompt)
        session.step(a)
        session.position = 25
        session.step(after[:, :2])
        stop_first_server(swarm, session)  # a replacement replays what the session holds
        got = session.step(after[:, 2:])
        assert session.num_failovers >= 1 and session.position == 30
    with model.inference_session(max_length=64) as fresh:
        want = fresh.step(torch.cat([prompt[:, :25], after], dim=1))[:, 27:]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()


# ---- Petals' client surface ----


def test_petals_names_for_the_parts_and_a_config_with_the_clients_settings(swarm, model, tiny_model: Path):
    from petals_like import RemoteSequential
    from petals_like.config import UNLIMITED_RETRIES

    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (HIDDEN, NUM_BLOCKS, model.spec.vocab_size)
    assert tuple(config.initial_peers) == tuple(swarm.peers) and config.use_push is True
    config.max_retries = 2  # the client's live settings, not a copy
    assert model.client_config.max_retries == 2
    config.max_retries = 6
    saved = config.to_dict()
    assert "initial_peers" not in saved and "_client_config" not in saved and saved["hidden_size"] == HIDDEN
    for body in (model.transformer, model.model):
        assert body.word_embeddings is body.embed_tokens is model.get_input_embeddings() is model.local.embed_tokens
        assert isinstance(body.h, RemoteSequential) and body.h is body.layers and len(body.h) == NUM_BLOCKS
        assert body.ln_f is body.norm is model.local.norm
    assert model.lm_head is model.get_output_embeddings() is model.local.lm_head
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.generation_config.eos_token_id == model.spec.eos_token_id
    from petals_like import AutoDistributedModelForCausalLM

    other = AutoDistributedModelForCausalLM.from_pretrained(tiny_model, dht=model.node, max_retries=None, torch_dtype="float32")
    try:
        assert other.node is model.node and other.client_config.max_retries == UNLIMITED_RETRIES
    finally:
        other.shutdown()  # a shared node stays up for its owner
    assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2).shape == (1, 5)


def test_a_slice_of_the_blocks_runs_forward_backward_and_inference_like_those_blocks_locally(model, tiny_model: Path):
    from petals_like.models.spec import ModelSpec
    from petals_like.server.loading import load_span

    spec = ModelSpec.from_pretrained(tiny_model)
    local = load_span(tiny_model, spec, 3, 6, torch.float32, torch.device("cpu"), progress=False)
    part = model.transformer.h[3:6]
    assert (part.start, part.end, len(part)) == (3, 6, 3) and (model.transformer.h[-1].start, model.transformer.h[2].end) == (
        7,
        3,
    )
    with pytest.raises(IndexError):
        model.transformer.h[5:5]
    x = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(2, 7, HIDDEN, generator=torch.Generator().manual_seed(3))

    remote_in = x.clone().requires_grad_()
    remote_out = part(remote_in)
    (remote_out * weights).sum().backward()
    local_in = x.clone().requires_grad_()
    local_out = local(local_in)
    (local_out * weights).sum().backward()
    assert torch.allclose(remote_out, local_out, rtol=1e-5, atol=1e-4)
    assert torch.allclose(remote_in.grad, local_in.grad, rtol=1e-5, atol=1e-4)

    with part.inference_session(max_length=16) as session:
        outs = [session.step(x[:, :5]), session.step(x[:, 5:6]), session.step(x[:, 6:])]
        assert {(link.span.start, link.span.end) for link in session._chain} <= {(3, 4), (4, 6), (3, 6)}
    with torch.no_grad():
        assert torch.allclose(torch.cat(outs, dim=1), local(x), rtol=1e-5, atol=1e-4)


def test_generate_inside_a_session_block_continues_that_session(model, reference):
    """As in Petals: inside `with model.inference_session(...)` (or use_session), generate() without
    session= runs in that session; another thread's generate() does not."""
    input_ids = torch.tensor([[1, 60, 61, 62]])
    expected = reference.generate(input_ids, max_new_tokens=8, do_sample=False)
    elsewhere: list = []
    with model.inference_session(max_length=32) as session:
        assert model.active_session is session
        first = model.generate(input_ids, max_new_tokens=4)
        thread = threading.Thread(
            target=lambda: elsewhere.append((model.active_session, model.generate(input_ids, max_new_tokens=2)))
        )
        thread.start()
        thread.join(60)
        rest = model.generate(None, max_new_tokens=4)
        assert session.position == input_ids.shape[1] + 7
    assert model.active_session is None
    assert torch.equal(torch.cat([first, rest], dim=1), expected)
    assert elsewhere[0][0] is None and torch.equal(elsewhere[0][1], expected[:, :6])
    other = model.inference_session(max_length=16)
    with model.use_session(other):
        assert model.active_session is other
        model.generate(input_ids, max_new_tokens=2)
        assert other.position == input_ids.shape[1] + 1
    other.close()


def test_seeded_sampling_with_the_checkpoints_defaults_equals_transformers(model, reference):
    """No sampling options at all: transformers samples with top_k=50 (its default); so does the client."""
    input_ids = torch.tensor([[1, 70, 71, 72], [1, 80, 81, 82]])
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        want = reference.generate(input_ids, max_new_tokens=12, do_sample=True)
        torch.manual_seed(seed)
        got = model.generate(input_ids, max_new_tokens=12, do_sample=True)
        assert torch.equal(got, want), seed


@pytest.mark.parametrize(
    "options", [dict(repetition_penalty=1.4), dict(no_repeat_ngram_size=2), dict(min_new_tokens=10)], ids=lambda o: str(o)
)
def test_greedy_options_equal_transformers(model, reference, options):
    input_ids = torch.tensor([[1, 90, 91, 92, 93]])
    want = reference.generate(input_ids, max_new_tokens=14, do_sample=False, **options)
    assert torch.equal(model.generate(input_ids, max_new_tokens=14, **options), want)


def test_return_dict_in_generate_with_scores_and_logits(model, reference):
    input_ids = torch.tensor([[1, 11, 12, 13]])
    want = reference.generate(
        input_ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True
    )
    got = model.generate(input_ids, max_new_tokens=5, return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(got.logits) == 5
    for mine, theirs in zip(got.scores + got.logits, want.scores + want.logits):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="contrastive search is not supported"):
        model.generate(input_ids, max_new_tokens=2, penalty_alpha=0.5, top_k=4)


def test_auto_distributed_config_and_base_model(swarm, model, reference, tiny_model: Path, caplog):
    import logging

    from petals_like import AutoDistributedConfig, AutoDistributedModel

    config = AutoDistributedConfig.from_pretrained(tiny_model, initial_peers=swarm.peers, show_route=True)
    assert config.hidden_size == HIDDEN and tuple(config.initial_peers) == tuple(swarm.peers)
    route_log = logging.getLogger("petals_like.route")
    route_log.addHandler(caplog.handler)
    base = AutoDistributedModel.from_pretrained(tiny_model, config=config, torch_dtype="float32")
    try:
        input_ids = torch.tensor([[1, 21, 22, 23, 24]])
        hidden = base(input_ids).last_hidden_state
        with torch.no_grad():
            want = reference.model(input_ids).last_hidden_state
        assert torch.allclose(hidden, want, rtol=1e-5, atol=1e-4)
        assert any(r.name == "petals_like.route" and "Route for forward (blocks 0:8)" in r.getMessage() for r in caplog.records)
        assert base.config.show_route is True and base.client_config is not None
    finally:
        route_log.removeHandler(caplog.handler)
        base.shutdown()


# ---- beam search: rows reordered on the servers ----


@pytest.mark.parametrize(
    "options",
    [dict(num_beams=4), dict(num_beams=3, num_return_sequences=2, length_penalty=0.6), dict(num_beams=4, early_stopping=True)],
    ids=lambda o: str(o),
)
def test_beam_search_equals_transformers(model, reference, options):
    input_ids = torch.tensor([[1, 30, 31, 32, 33], [1, 44, 45, 46, 47]])
    want = reference.generate(input_ids, max_new_tokens=10, do_sample=False, **options)
    got = model.generate(input_ids, max_new_tokens=10, **options)
    assert torch.equal(got, want)


def test_reordered_rows_equal_sessions_fed_the_reordered_histories(swarm, model):
    """hypo_ids [2, 2, 0]: rows 0 and 1 both continue row 2 (they share its full pages, each gets its
    own copy of the partial one), row 2 continues row 0; the old row 1 is dropped."""
    first, second = torch.randn(3, 20, HIDDEN, generator=torch.Generator().manual_seed(8)), torch.randn(3, 3, HIDDEN)
    hypo = torch.tensor([2, 2, 0])
    pools = [server.sessions.pool for server in swarm.servers]
    with model.inference_session(max_length=32) as session:
        session.step(first)
        free = [pool.num_free for pool in pools]
        got = session.step(second, hypo_ids=hypo)
        # 3 rows x 2 pages before; after: the old row 1's 2 pages went back, row 2's full page is shared
        # by two rows and its partial page copied once (each row needs its own): 2 + 1 + 2 = 5 pages
        assert [pool.num_free for pool in pools] == [n + 1 for n in free]
    with model.inference_session(max_length=32) as fresh:
        fresh.step(first[hypo])
        want = fresh.step(second)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"hypo_ids must be in \[0, 3\)"):
        with model.inference_session(max_length=32) as session:
            session.step(first)
            session.step(second, hypo_ids=torch.tensor([0, 1, 3]))


def test_failover_in_the_step_that_reorders_rows(replicated):
    """The server of the first span is gone when a reordering step arrives: its replacement is rebuilt
    from the reordered history and must not reorder again; the later server reorders once."""
    swarm, model = replicated
    gen = torch.Generator().manual_seed(4)
    first, second = torch.randn(3, 18, HIDDEN, generator=gen), torch.randn(3, 2, HIDDEN, generator=gen)
    hypo = torch.tensor([1, 0, 1])
    with model.inference_session(max_length=32) as session:
        session.step(first)
        stop_first_server(swarm, session)
        got = session.step(second, hypo_ids=hypo)
        assert session.num_failovers >= 1
    with model.inference_session(max_length=32) as fresh:
        fresh.step(first[hypo])
        want = fresh.step(second)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()
